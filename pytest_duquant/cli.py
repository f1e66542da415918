"""`duquant` command line: each subcommand is a module of pytest_duquant.commands with register(subparsers)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pytest_duquant import commands as _commands
from pytest_duquant import progress
from pytest_duquant.config import DuQuantConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duquant", description="DuQuant for pi0.5: quantize, test, gate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{_commands.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2

    def func(a):
        try:
            with progress.reporting_to(progress.to_stderr):  # a line for every phase that lasts (stderr)
                return args.func(a)
        except DuQuantConfigError as exc:
            print(f"duquant: configuration error: {exc}", file=sys.stderr)
            return 2

    return _commands.run_command(func, args, f"duquant {args.command}")


if __name__ == "__main__":
    sys.exit(main())
