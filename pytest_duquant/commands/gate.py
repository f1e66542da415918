"""`duquant gate RESULTS GOLDEN`: judge a rollout results file against the LIBERO golden(s).

Every suite in the results is judged (or reported as not judgeable); the exit code is the worst:
0 pass (the drop is shown below the allowed drop), 1 regression (shown above it), 2 unusable input
(missing/malformed files, no golden for a suite, another fingerprint/protocol/seed, episodes of the
declared plan missing from the run, too few episodes), 3 inconclusive / keep running (sequential),
4 internal error. The judging is pytest_duquant.judge.judge, the same call as `pytest -m libero`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_UNUSABLE = 2


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gate",
        help="judge rollout results against LIBERO goldens (exit 0 pass, 1 regression, 2 unusable, 3 inconclusive)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results JSONL file, or a directory of *.jsonl")
    p.add_argument("golden", help="golden JSON file, or a golden root (golden/, golden/libero/ or its <fingerprint>/)")
    p.add_argument("--preset", help="preset whose allowed drop applies (default: the results' preset)")
    p.add_argument("--alpha", type=float, help="test level of each side (default: the golden's alpha)")
    p.add_argument("--allowed-drop", type=float,
                   help="allowed drop in success rate, 0.05 = 5 points (default: the golden's value for the preset)")
    p.add_argument("--tasks", default=None, help="the run's declared task ids, e.g. 0-9 (default: the golden's)")
    p.add_argument("--trials", default=None,
                   help="the run's declared trials: N (= 0..N-1) or ids like 0,2-3 (default: the golden's)")
    p.add_argument("--fp-results", default=None, metavar="FILE",
                   help="same-machine mode: the FP arm rolled out in the same job (the golden then checks its drift)")
    p.add_argument("--mode", choices=("paired", "unpaired", "sequential"), default="paired",
                   help="paired (default): the golden's episodes; sequential: looks while the run goes on")
    p.add_argument("--looks", type=int, default=4, help="sequential mode: number of equally spaced looks")
    p.add_argument("--in-flight", type=int, default=8,
                   help="sequential mode: episodes that may still run out of order (more missing = unusable)")
    p.add_argument("--multiplicity", choices=("bonferroni", "none"), default="bonferroni",
                   help="several suites: regression side at alpha / suites (default bonferroni)")
    p.add_argument("--min-episodes", type=int, default=20,
                   help="fewer planned episodes per suite than this is unusable input (default 20)")
    p.add_argument("--max-mdd", type=float, default=None,
                   help="a pass whose minimum detectable drop (80%% power) exceeds this is inconclusive")
    p.add_argument("--json", dest="json_out", help="write the judgement as JSON here")


def _ids(text: str | None, what: str, count_means_range: bool) -> list[int] | None:
    if text is None:
        return None
    from pytest_duquant.libero.protocol import parse_ids

    if count_means_range and text.strip().isdigit():
        return list(range(int(text)))
    return parse_ids(text, n=10**6, what=what)


def _writable(path: str) -> str | None:
    """Why the --json path cannot be written, or None."""
    parent = Path(path).expanduser().resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK) or Path(path).is_dir():
        return f"--json {path}: cannot write there"
    return None


def run(args: argparse.Namespace) -> int:
    from pytest_duquant.gate import GateInputError
    from pytest_duquant.golden.common import GoldenError
    from pytest_duquant.judge import judge
    from pytest_duquant.reporting.verdict import render
    from pytest_duquant.results import ResultsError, read_results

    problem = _writable(args.json_out) if args.json_out else None
    if problem:  # checked before judging: a printed verdict is always the one that stands
        print(f"duquant gate: unusable input: {problem}", file=sys.stderr)
        return EXIT_UNUSABLE
    try:
        tasks = _ids(args.tasks, "--tasks", False)
        trials = _ids(args.trials, "--trials", True)
        records = read_results(args.results)
        reference = read_results(args.fp_results) if args.fp_results else None
        judgement = judge(
            records, args.golden, preset=args.preset, allowed_drop=args.allowed_drop, alpha=args.alpha,
            mode=args.mode, tasks=tasks, trials=trials, reference=reference, multiplicity=args.multiplicity,
            min_episodes=args.min_episodes, max_mdd=args.max_mdd, looks=args.looks, in_flight=args.in_flight,
        )
    except (ResultsError, GoldenError, GateInputError, ValueError) as e:
        print(f"duquant gate: unusable input: {e}", file=sys.stderr)
        if args.json_out:
            _write_json(args.json_out, {"verdict": "unusable", "exit_code": EXIT_UNUSABLE, "error": str(e)})
        return EXIT_UNUSABLE
    if args.json_out:  # written before the verdict is printed: a printed verdict is the one that stands
        _write_json(args.json_out, judgement.to_dict())
    print(render(judgement))
    return judgement.exit_code


def _write_json(path: str, obj: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m pytest_duquant.commands.gate``); `duquant gate` is the usual one."""
    from pytest_duquant.commands import run_command

    p = argparse.ArgumentParser(prog="duquant gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_command(run, p.parse_args(argv), "duquant gate")


if __name__ == "__main__":
    raise SystemExit(main())
