"""`duquant golden make RESULTS.jsonl [--root golden/] [--force]`: an FP rollout results file -> LIBERO goldens.

One golden per suite in the results, at <root>/libero/<fingerprint>/<suite>.json. Refused (exit 2): results
of a quantized preset, several checkpoints or protocols, a killed run (truncated last line, or a tasks x
trials grid with holes; --tasks/--trials declare the grid the run was asked for). An existing, different
golden is never replaced silently: the changes are printed and --force is needed (the old file is kept as
<suite>.json.<UTC>.bak). Exit status: 0 written or unchanged, 2 refused.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("golden", help="make LIBERO goldens from an FP run's results", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="golden_command", metavar="ACTION", required=True)
    make = sub.add_parser("make", help="FP results JSONL -> golden/libero/<fingerprint>/<suite>.json",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    make.add_argument("results", help="results JSONL file of an FP run (or a directory of *.jsonl)")
    make.add_argument("--root", default="golden", help="golden root (default: ./golden)")
    make.add_argument("--suite", default=None, help="only this suite (default: every suite in the results)")
    make.add_argument("--tasks", default=None, help="task ids the run was asked for, e.g. 0-9 (default: those present)")
    make.add_argument("--trials", default=None, help="trials the run was asked for: N or ids (default: those present)")
    make.add_argument("--alpha", type=float, default=None, help="test level recorded in the golden (default 0.05)")
    make.add_argument("--allowed-drop", action="append", default=[], metavar="PRESET=DROP",
                      help="override one preset's allowed drop (repeatable), e.g. B=0.05")
    make.add_argument("--force", action="store_true", help="replace an existing, different golden")
    make.set_defaults(func=run)


def _table(items: list[str]) -> dict[str, float]:
    from pytest_duquant.config import ALLOWED_DROP

    out = dict(ALLOWED_DROP)
    for item in items:
        preset, sep, value = item.partition("=")
        try:
            out[preset.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--allowed-drop {item!r}: expected PRESET=DROP, e.g. B=0.05") from None
        if not sep:
            raise ValueError(f"--allowed-drop {item!r}: expected PRESET=DROP, e.g. B=0.05")
    return out


def run(args: argparse.Namespace) -> int:
    from pytest_duquant.commands.gate import _ids
    from pytest_duquant.golden.common import GoldenError, GoldenExistsError
    from pytest_duquant.golden.episodes import DEFAULT_ALPHA, golden_from_results, path_for, write
    from pytest_duquant.results import ResultsError, read_results

    try:
        records = read_results(args.results, on_truncated="error")
        suites = [args.suite] if args.suite else sorted({r.suite for r in records})
        goldens = [
            golden_from_results(
                records, suite=s, alpha=DEFAULT_ALPHA if args.alpha is None else args.alpha,
                allowed_drop=_table(args.allowed_drop), tasks=_ids(args.tasks, "--tasks", False),
                trials=_ids(args.trials, "--trials", True), config={"preset": "fp", "results": str(args.results)},
            )
            for s in suites
        ]
    except ResultsError as e:
        print(f"duquant golden make: refused: {e} (a truncated last line means the run was killed: resume it)",
              file=sys.stderr)
        return 2
    except (GoldenError, ValueError) as e:
        print(f"duquant golden make: refused: {e}", file=sys.stderr)
        return 2
    code = 0
    for g in goldens:
        path = path_for(args.root, g.fingerprint, g.suite)
        try:
            result = write(path, g, replace=args.force, how="--force")
        except GoldenExistsError as e:
            print(f"duquant golden make: {e}", file=sys.stderr)
            code = 2
            continue
        print(f"{result.summary()}  (FP {g.successes}/{len(g.episodes)} = {g.success_rate:.1%})")
    return code
