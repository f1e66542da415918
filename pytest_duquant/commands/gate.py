"""`duquant gate RESULTS GOLDEN`: judge a rollout results file against the LIBERO golden(s).

Exit codes: 0 pass, 1 regression, 2 unusable input (missing/malformed files, fingerprint or protocol
mismatch, no allowed drop for the preset, too few episodes, or inconclusive under --max-mdd),
3 (only with --mode sequential) undecided: keep running.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..gate import (
    CONTINUE,
    INCONCLUSIVE,
    PASS,
    REGRESSION,
    GateDecision,
    GateInputError,
    design_sequential,
    gate,
    sequential_monitor,
)
from ..golden_libero import GoldenError, LiberoGolden, check_compatible, find_golden, read_golden
from ..results_io import EpisodeResult, ResultsFormatError, outcomes, read_results

EXIT_PASS, EXIT_REGRESSION, EXIT_UNUSABLE, EXIT_CONTINUE = 0, 1, 2, 3


class UnusableInput(Exception):
    exit_code = EXIT_UNUSABLE


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "gate",
        help="judge rollout results against LIBERO goldens (exit 0 pass, 1 regression, 2 unusable input)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", help="results JSONL file, or a directory of *.jsonl")
    p.add_argument(
        "golden", help="golden JSON file, or a golden root (golden/, golden/libero/ or its <fingerprint>/)"
    )
    p.add_argument("--preset", help="preset whose allowed drop applies (default: the results' preset)")
    p.add_argument("--alpha", type=float, help="test level (default: the golden's alpha)")
    p.add_argument(
        "--allowed-drop",
        type=float,
        help="allowed drop in success rate, 0.05 = 5 points (default: the golden's value for the preset)",
    )
    p.add_argument(
        "--mode",
        choices=("auto", "paired", "unpaired", "sequential"),
        default="auto",
        help="auto: paired on shared episodes when possible, else unpaired (default)",
    )
    p.add_argument("--looks", type=int, default=4, help="sequential mode: number of equally spaced looks")
    p.add_argument(
        "--multiplicity",
        choices=("holm", "bonferroni", "none"),
        default="holm",
        help="several suites at once: familywise correction of the false-fail rate (default holm)",
    )
    p.add_argument(
        "--min-episodes",
        type=int,
        default=20,
        help="fewer judged episodes per suite than this is unusable input (default 20)",
    )
    p.add_argument(
        "--max-mdd",
        type=float,
        default=None,
        help="a pass whose minimum detectable drop (80%% power) exceeds this is inconclusive (exit 2)",
    )
    p.add_argument("--json", dest="json_out", help="write the decisions as JSON here")


def _unique(values: set, what: str) -> Any:
    vals = {v for v in values if v is not None}
    if None in values:
        raise UnusableInput(f"some results do not name their {what}: cannot check them against the golden")
    if len(vals) != 1:
        raise UnusableInput(f"results mix several {what}s: {sorted(map(str, vals))}; gate one run at a time")
    return next(iter(vals))


def _holm(pvals: list[float]) -> list[float]:
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i])
    adj = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        adj[i] = running
    return adj


def _fmt_pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _table(rows: list[dict[str, Any]]) -> str:
    head = [
        "suite",
        "mode",
        "n",
        "ref %",
        "cand %",
        "drop",
        "CI of drop",
        "allowed",
        "p",
        "p adj",
        "MDD80",
        "verdict",
    ]
    lines = []
    for r in rows:
        d: GateDecision = r["decision"]
        ci = "-" if d.ci is None else f"[{_fmt_pct(d.ci[0])}, {_fmt_pct(d.ci[1])}]"
        lines.append(
            [
                r["suite"],
                d.mode,
                str(d.n),
                _fmt_pct(d.reference_rate),
                _fmt_pct(d.candidate_rate),
                _fmt_pct(d.drop),
                ci,
                _fmt_pct(d.allowed_drop),
                "-" if d.p_value is None else f"{d.p_value:.3g}",
                "-" if r["p_adjusted"] is None else f"{r['p_adjusted']:.3g}",
                _fmt_pct(d.mdd),
                r["verdict"].upper(),
            ]
        )
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*x) for x in lines]
    return "\n".join(out)


def _load_goldens(
    golden_arg: str, suites: list[str], fingerprint: str, protocol: str
) -> dict[str, LiberoGolden]:
    gp = Path(golden_arg)
    if gp.is_file():
        g = read_golden(gp, fingerprint=fingerprint, protocol=protocol)
        if g.suite not in suites:
            raise UnusableInput(f"{gp}: golden is for suite {g.suite!r}, the results hold {suites}")
        return {g.suite: g}
    if not gp.exists():
        raise UnusableInput(f"{gp}: golden file or directory not found")
    out = {}
    for s in suites:
        g = read_golden(find_golden(gp, fingerprint, s))
        check_compatible(
            g,
            fingerprint=fingerprint,
            protocol=protocol,
            suite=s,
            source=str(find_golden(gp, fingerprint, s)),
        )
        out[s] = g
    return out


def evaluate(args: argparse.Namespace) -> tuple[int, dict[str, Any], str]:
    """Run the gate; returns (exit code, JSON-able report, printable text). Raises on unusable input."""
    records: list[EpisodeResult] = read_results(args.results)
    if not records:
        raise UnusableInput(f"{args.results}: no finished episodes in the results")
    fingerprint = _unique({r.fingerprint for r in records}, "checkpoint fingerprint")
    protocol = _unique({r.protocol for r in records}, "protocol")
    preset = args.preset or _unique({r.preset for r in records}, "preset")
    suites = sorted({r.suite for r in records})
    goldens = _load_goldens(args.golden, suites, fingerprint, protocol)
    judged = sorted(goldens)
    skipped = [s for s in suites if s not in goldens]
    rows: list[dict[str, Any]] = []
    for s in judged:
        gd = goldens[s]
        alpha = args.alpha if args.alpha is not None else gd.alpha
        delta = args.allowed_drop if args.allowed_drop is not None else gd.allowed_drop_for(preset)
        cand = outcomes(r for r in records if r.suite == s)
        ref = gd.outcomes()
        rows.append({"suite": s, "alpha": alpha, "delta": delta, "ref": ref, "cand": cand})
    m = len(rows)
    if args.mode == "sequential":
        for r in rows:
            a = r["alpha"] / m if args.multiplicity != "none" else r["alpha"]
            design = design_sequential(len(r["ref"]), allowed_drop=r["delta"], alpha=a, looks=args.looks)
            d = sequential_monitor(r["ref"], r["cand"], design=design)
            r.update(decision=d, p_adjusted=None, verdict=d.verdict)
    else:
        for r in rows:
            d = gate(
                r["ref"],
                r["cand"],
                allowed_drop=r["delta"],
                alpha=r["alpha"],
                mode=args.mode,
                max_mdd=args.max_mdd,
            )
            if d.n_candidate < args.min_episodes:
                raise UnusableInput(
                    f"suite {r['suite']}: only {d.n_candidate} episodes judged ({d.mode}), fewer than "
                    f"--min-episodes {args.min_episodes}: too few to judge"
                )
            r.update(decision=d)
        ps = [r["decision"].p_value for r in rows]
        if args.multiplicity == "holm":
            adj = _holm(ps)
        elif args.multiplicity == "bonferroni":
            adj = [min(1.0, m * p) for p in ps]
        else:
            adj = ps
        for r, pa in zip(rows, adj, strict=True):
            d = r["decision"]
            r["p_adjusted"] = pa
            if d.verdict == INCONCLUSIVE:
                r["verdict"] = INCONCLUSIVE
            else:
                r["verdict"] = REGRESSION if pa <= r["alpha"] else PASS
    verdicts = [r["verdict"] for r in rows]
    if REGRESSION in verdicts:
        code, overall = EXIT_REGRESSION, REGRESSION
    elif INCONCLUSIVE in verdicts:
        code, overall = EXIT_UNUSABLE, INCONCLUSIVE
    elif CONTINUE in verdicts:
        code, overall = EXIT_CONTINUE, CONTINUE
    else:
        code, overall = EXIT_PASS, PASS
    text = [
        f"duquant gate: checkpoint {fingerprint}, protocol {protocol}, preset {preset}, mode {args.mode}"
        + (f", {m} suites ({args.multiplicity} correction)" if m > 1 else ""),
        "",
        _table(rows),
        "",
    ]
    for r in rows:
        text.append(f"{r['suite']}: {r['decision'].explanation}")
        if r["verdict"] != r["decision"].verdict:
            text.append(f"  after the {args.multiplicity} correction over {m} suites: {r['verdict'].upper()}")
    if skipped:
        text.append(f"(no golden for {skipped}: not judged)")
    text.append("")
    text.append(f"VERDICT: {overall.upper()} (exit {code})")
    report = {
        "verdict": overall,
        "exit_code": code,
        "fingerprint": fingerprint,
        "protocol": protocol,
        "preset": preset,
        "mode": args.mode,
        "multiplicity": args.multiplicity,
        "not_judged": skipped,
        "suites": [
            {
                "suite": r["suite"],
                "verdict": r["verdict"],
                "p_adjusted": r["p_adjusted"],
                "decision": r["decision"].to_dict(),
            }
            for r in rows
        ],
    }
    return code, report, "\n".join(text)


def run(args: argparse.Namespace) -> int:
    try:
        code, report, text = evaluate(args)
    except (UnusableInput, GoldenError, ResultsFormatError, GateInputError) as e:
        print(f"duquant gate: unusable input: {e}", file=sys.stderr)
        if getattr(args, "json_out", None):
            _write_json(args.json_out, {"verdict": "unusable", "exit_code": EXIT_UNUSABLE, "error": str(e)})
        return EXIT_UNUSABLE
    print(text)
    if args.json_out:
        _write_json(args.json_out, report)
    return code


def _write_json(path: str, obj: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m pytest_duquant.commands.gate``); `duquant gate` is the usual one."""
    p = argparse.ArgumentParser(
        prog="duquant gate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
