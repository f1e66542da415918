"""One module per `duquant` subcommand; each defines register(subparsers) and a run(args) -> int."""

from __future__ import annotations

import sys
import traceback

EXIT_INTERNAL = 4


def run_command(func, args, prog: str = "duquant") -> int:
    """Run a subcommand; an unexpected exception is an internal error: traceback on stderr, exit 4."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - everything expected is handled by the command itself
        traceback.print_exc()
        print(f"{prog}: internal error ({type(exc).__name__}: {exc}); please report it (exit 4)", file=sys.stderr)
        return EXIT_INTERNAL
