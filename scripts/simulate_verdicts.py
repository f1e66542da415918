#!/usr/bin/env python
"""The three-way verdict of the paired gate (PASS / REGRESSION / INCONCLUSIVE): how often each comes out.

For n paired episodes, FP success rate p_FP and a true drop d (success-rate units), the candidate's
episodes pair with the FP's as a trinomial: P(FP success, candidate failure) = p_b, P(FP failure,
candidate success) = p_c, d = p_b - p_c. Pairing model: the candidate wins back a share r of the FP's
failures, p_c = r (1 - p_FP) (r = 0.2 by default; the worst case over p_c is reported too).

The verdict of every possible (b, c) comes from `gate.verdict_table` (the gate's own rule: REGRESSION
when the exact lower confidence bound of the drop is above delta, PASS when the upper bound is below it,
on gate's grid), so the rates below are EXACT sums over the trinomial distribution, not Monte-Carlo
estimates. A Monte-Carlo run of `gate()` itself on sampled tables (--check, default 20 distinct tables
per cell) confirms that gate() and the table agree.

    python scripts/simulate_verdicts.py            # ~3-5 min on 2 cores: table + docs/results/verdict_simulation.json
    python scripts/simulate_verdicts.py --quick    # n in {50, 100}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_duquant import gate as g  # noqa: E402

CODE = {1: g.REGRESSION, 0: g.PASS, -1: g.INCONCLUSIVE}


def rates(table: np.ndarray, n: int, p_b: float, p_c: float) -> dict[str, float]:
    probs = g._trinomial_grid(n, p_b, p_c)
    return {name: float(probs[table == code].sum()) for code, name in CODE.items()}


def old_pass(n: int, delta: float, alpha: float, drop: float, p_c: float) -> float:
    """The old gate: PASS = "not rejected" (no upper bound required)."""
    return 1.0 - g.paired_power(n, delta, alpha, drop, p_c)


def check_against_gate(rng, table, n, delta, alpha, p_b, p_c, tables: int) -> int:
    """gate() on sampled (b, c) tables must give the verdict the table gives; returns how many were checked."""
    draws = rng.multinomial(n, [p_b, p_c, 1 - p_b - p_c], size=4 * tables)
    seen = []
    for b, c, _ in draws:
        if (b, c) not in seen:
            seen.append((int(b), int(c)))
        if len(seen) == tables:
            break
    keys = [("s", 0, i, 7) for i in range(n)]
    for b, c in seen:
        ref = {k: i >= c for i, k in enumerate(keys)}
        cand = {k: (i < c) or (i >= c + b and ref[k]) for i, k in enumerate(keys)}
        d = g.gate(ref, cand, allowed_drop=delta, alpha=alpha)
        if CODE[int(table[b, c])] != d.verdict:
            raise AssertionError(f"n={n} b={b} c={c}: table says {CODE[int(table[b, c])]}, gate() {d.verdict}")
    return len(seen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta", type=float, default=0.05)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--win-back", type=float, default=0.2, help="r: p_c = r (1 - p_FP)")
    ap.add_argument("--check", type=int, default=20, help="distinct tables per cell checked with gate() itself")
    ap.add_argument("--quick", action="store_true", help="n in {50, 100} only")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/results/verdict_simulation.json"))
    args = ap.parse_args()
    delta, alpha = args.delta, args.alpha
    ns = (50, 100) if args.quick else (50, 100, 200, 500)
    p_fps = (0.98, 0.9, 0.75)
    rng = np.random.default_rng(20261201)
    rows, checked = [], 0
    t0 = time.perf_counter()
    for n in ns:
        table = g.verdict_table(n, delta, alpha)
        for p_fp in p_fps:
            p_c = args.win_back * (1 - p_fp)
            at = {d: rates(table, n, p_c + d, p_c) for d in (0.0, delta, 2 * delta)}
            grid = [p_c] + [x for x in np.linspace(0, (1 - 2 * delta) / 2, 41) if x + 2 * delta <= p_fp + 1e-12]
            worst_pass = max(rates(table, n, x + 2 * delta, x)[g.PASS] for x in grid)
            worst_reg = max(rates(table, n, x + delta, x)[g.REGRESSION] for x in grid)
            if args.check:
                checked += check_against_gate(rng, table, n, delta, alpha, p_c + 2 * delta, p_c, args.check // 2)
                checked += check_against_gate(rng, table, n, delta, alpha, p_c, p_c, args.check // 2)
            rows.append({
                "n": n, "p_fp": p_fp, "p_c": round(p_c, 4),
                "false_pass_at_2delta": at[2 * delta][g.PASS],
                "false_pass_at_2delta_worst_p_c": worst_pass,
                "old_false_pass_at_2delta": old_pass(n, delta, alpha, 2 * delta, p_c),
                "false_regression_at_delta": at[delta][g.REGRESSION],
                "false_regression_at_delta_worst_p_c": worst_reg,
                "inconclusive_at_0": at[0.0][g.INCONCLUSIVE],
                "pass_at_0": at[0.0][g.PASS],
                "inconclusive_at_delta": at[delta][g.INCONCLUSIVE],
                "inconclusive_at_2delta": at[2 * delta][g.INCONCLUSIVE],
                "regression_at_2delta": at[2 * delta][g.REGRESSION],
            })
            print(f"n={n:4d} p_FP={p_fp:.2f} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    head = ("| n | p_FP | false PASS at 2δ | (max over p_c) | old gate | false REGRESSION at δ | (max over p_c) "
            "| INCONCLUSIVE at 0 / δ / 2δ | PASS at 0 | REGRESSION at 2δ |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['p_fp']:.2f} | {r['false_pass_at_2delta']:.4f}"
            f" | {r['false_pass_at_2delta_worst_p_c']:.4f}"
            f" | {r['old_false_pass_at_2delta']:.3f} | {r['false_regression_at_delta']:.4f}"
            f" | {r['false_regression_at_delta_worst_p_c']:.4f} | {r['inconclusive_at_0']:.3f} / "
            f"{r['inconclusive_at_delta']:.3f} / {r['inconclusive_at_2delta']:.3f} | {r['pass_at_0']:.3f}"
            f" | {r['regression_at_2delta']:.3f} |"
        )
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "what": "three-way paired verdict rates (exact sums over the trinomial of gate.verdict_table)",
        "delta": delta, "alpha": alpha, "win_back": args.win_back, "seed": 20261201,
        "tables_checked_against_gate": checked, "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows, "markdown": "\n".join(lines),
    }, indent=1) + "\n")
    print(f"wrote {out} ({checked} sampled tables agreed with gate())", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
