#!/usr/bin/env python
"""Simulation proof of pytest_duquant.gate: false-fail rate, power, pairing gain, sequential savings.

Every decision below is the gate's own decision rule (its exact critical values applied to simulated
counts: p <= alpha <=> statistic >= critical value), so the rates are those of `gate()` itself.

    python scripts/simulate_gate.py                      # ~20 s: table + docs/gate_simulation.json
    python scripts/simulate_gate.py --sims 2000 --quick  # smoke run

Scenarios (LIBERO-like: reference success ~95%):
  * boundary: true drop == allowed drop, several discordance levels (the nuisance parameter), and a
    heterogeneous 10-task scenario (task success rates 0.6-1.0, drop concentrated in a few tasks):
    the false-fail rate must be <= alpha (up to Monte-Carlo error).
  * power at stated drops, paired vs unpaired at equal N per arm (unpaired = two independent runs).
  * sequential (4 looks, O'Brien-Fleming spending, early pass): false-fail, power, expected episodes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_duquant import gate as g  # noqa: E402


def se(p: float, m: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / m)


def paired_reject(n, delta, alpha, counts):
    u = g.paired_critical_value(n, delta, alpha)
    zs = g._paired_zstar(n, delta)
    return zs[counts[:, 0], counts[:, 1]] >= u


def unpaired_reject(n1, n2, delta, alpha, x1, x2):
    u = g.unpaired_critical_value(n1, n2, delta, alpha)
    zs = g._unpaired_zstar(n1, n2, delta)
    return zs[x1, x2] >= u


def trinomial(rng, n, pb, pc, sims):
    return rng.multinomial(n, [pb, pc, 1.0 - pb - pc], size=sims)


def hetero_counts(rng, n, delta, sims, tasks=10):
    """Per-task rates differ; episodes split evenly over tasks; average drop == delta."""
    r = np.linspace(0.6, 1.0, tasks)  # reference success per task
    pc = np.full(tasks, 0.01)  # candidate-only success (applied to ref failures' share)
    # drop concentrated on the 3 hardest tasks: p_b - p_c = 10/3 * delta there, 0 elsewhere
    extra = np.zeros(tasks)
    extra[:3] = delta * tasks / 3
    pb = pc + extra
    per = [n // tasks + (1 if t < n % tasks else 0) for t in range(tasks)]
    b = np.zeros(sims, dtype=int)
    c = np.zeros(sims, dtype=int)
    for t in range(tasks):
        pbt, pct = min(pb[t], r[t]), min(pc[t], 1 - r[t])
        m = rng.multinomial(per[t], [pbt, pct, 1 - pbt - pct], size=sims)
        b += m[:, 0]
        c += m[:, 1]
    true_drop = float(np.dot(per, np.minimum(pb, r) - np.minimum(pc, 1 - r)) / n)
    return np.stack([b, c], axis=1), true_drop


def sequential_run(rng, design, pb, pc, sims):
    """Simulate the design's looks; returns (verdict codes 1=regression 0=pass, episodes used)."""
    looks = design.looks
    verdict = np.full(sims, -1)
    used = np.full(sims, looks[-1])
    b = np.zeros(sims, dtype=int)
    c = np.zeros(sims, dtype=int)
    prev = 0
    for k, nk in enumerate(looks):
        inc = rng.multinomial(nk - prev, [pb, pc, 1 - pb - pc], size=sims)
        prev = nk
        b += inc[:, 0]
        c += inc[:, 1]
        active = verdict < 0
        reg = active & (g._paired_zstar(nk, design.allowed_drop)[b, c] >= design.regression_bounds[k])
        verdict[reg] = 1
        used[reg] = nk
        if k == len(looks) - 1:
            verdict[verdict < 0] = 0
            break
        if k < len(design.pass_bounds):
            active = verdict < 0
            ps = active & (g._paired_zstar(nk, -design.pass_drop)[c, b] >= design.pass_bounds[k])
            verdict[ps] = 0
            used[ps] = nk
    return verdict, used


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sims", type=int, default=50000, help="simulated runs per cell (default 50000)")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--delta", type=float, default=0.05, help="allowed drop")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500], help="pairs per run")
    ap.add_argument("--seed", type=int, default=20261124)
    ap.add_argument(
        "--json", default=str(Path(__file__).resolve().parents[1] / "docs" / "gate_simulation.json")
    )
    ap.add_argument("--quick", action="store_true", help="fewer scenarios")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    alpha, delta, sims = a.alpha, a.delta, a.sims
    t0 = time.time()
    out: dict = {
        "sims": sims,
        "alpha": alpha,
        "allowed_drop": delta,
        "seed": a.seed,
        "sizes": a.sizes,
        "false_fail": [],
        "power": [],
        "sequential": [],
    }
    p_ref = 0.95
    drops = [delta + 0.02, delta + 0.05, 0.10, 0.20]
    drops = sorted({round(d, 4) for d in drops if d > delta})
    pcs = [0.0, 0.01, 0.05] if not a.quick else [0.01]

    print(
        f"== false-fail rate at the boundary (true drop = allowed drop = {delta}), alpha = {alpha}, "
        f"{sims} runs each"
    )
    print(f"{'test':<10}{'n':>6}  {'scenario':<34}{'false-fail':>11}{'+-3SE':>9}{'exact':>9}")
    for n in a.sizes:
        for pc in pcs:
            cnt = trinomial(rng, n, pc + delta, pc, sims)
            r = float(paired_reject(n, delta, alpha, cnt).mean())
            ex = g.paired_power(n, delta, alpha, delta, pc)
            row = {
                "test": "paired",
                "n": n,
                "scenario": f"p_c={pc}",
                "rate": r,
                "se": se(r, sims),
                "exact": ex,
            }
            out["false_fail"].append(row)
            print(f"{'paired':<10}{n:>6}  {row['scenario']:<34}{r:>11.4f}{3 * se(r, sims):>9.4f}{ex:>9.4f}")
        cnt, td = hetero_counts(rng, n, delta, sims)
        r = float(paired_reject(n, delta, alpha, cnt).mean())
        row = {
            "test": "paired",
            "n": n,
            "scenario": f"10 tasks heterogeneous (drop={td:.3f})",
            "rate": r,
            "se": se(r, sims),
            "exact": None,
        }
        out["false_fail"].append(row)
        print(f"{'paired':<10}{n:>6}  {row['scenario']:<34}{r:>11.4f}{3 * se(r, sims):>9.4f}{'':>9}")
        for p2 in [p_ref - delta, 0.5] if not a.quick else [p_ref - delta]:
            x1 = rng.binomial(n, p2 + delta, sims)
            x2 = rng.binomial(n, p2, sims)
            r = float(unpaired_reject(n, n, delta, alpha, x1, x2).mean())
            ex = g.unpaired_power(n, n, delta, alpha, p2 + delta, p2)
            row = {
                "test": "unpaired",
                "n": n,
                "scenario": f"p_ref={p2 + delta:.2f}",
                "rate": r,
                "se": se(r, sims),
                "exact": ex,
            }
            out["false_fail"].append(row)
            print(f"{'unpaired':<10}{n:>6}  {row['scenario']:<34}{r:>11.4f}{3 * se(r, sims):>9.4f}{ex:>9.4f}")

    print(f"\n== power at equal N per arm (reference {p_ref:.0%}; paired: P(ref fail, cand success) = 0.01)")
    print(
        f"{'n':>6}{'true drop':>11}{'paired':>9}{'unpaired':>10}{'gain':>8}  paired MDD / unpaired MDD (80%)"
    )
    for n in a.sizes:
        mdd_p = g._paired_mdd(n, delta, alpha, 0.01, 0.8)
        mdd_u = g._unpaired_mdd(n, n, delta, alpha, p_ref, 0.8)
        for d in drops:
            pc = 0.01
            cnt = trinomial(rng, n, pc + d, pc, sims)
            rp = float(paired_reject(n, delta, alpha, cnt).mean())
            x1 = rng.binomial(n, p_ref, sims)
            x2 = rng.binomial(n, p_ref - d, sims)
            ru = float(unpaired_reject(n, n, delta, alpha, x1, x2).mean())
            row = {
                "n": n,
                "drop": d,
                "paired": rp,
                "unpaired": ru,
                "gain": rp - ru,
                "paired_mdd": mdd_p,
                "unpaired_mdd": mdd_u,
            }
            out["power"].append(row)
            print(
                f"{n:>6}{d:>11.3f}{rp:>9.3f}{ru:>10.3f}{rp - ru:>+8.3f}  "
                f"{(mdd_p or float('nan')):.3f} / {(mdd_u or float('nan')):.3f}"
            )

    print(
        "\n== sequential (4 looks, O'Brien-Fleming spending, early pass once 'drop >= allowed' is rejected), "
        "paired"
    )
    print(
        f"{'n_max':>6}{'true drop':>11}{'p_c':>6}{'reject seq':>11}{'(exact)':>9}{'fixed (exact)':>14}"
        f"{'E[episodes]':>12}{'(exact)':>9}{'saved':>8}"
    )
    for n in a.sizes:
        design = g.design_sequential(n, allowed_drop=delta, alpha=alpha, looks=4)
        cases = [(0.0, 0.01)] + [(delta, pc) for pc in pcs] + [(d, 0.01) for d in drops]
        for d, pc in cases:
            verdict, used = sequential_run(rng, design, pc + d, pc, sims)
            fixed = g.paired_power(n, delta, alpha, d, pc)
            oc = g.sequential_operating_characteristics(design, d, pc)
            rs = float((verdict == 1).mean())
            en = float(used.mean())
            row = {
                "n_max": n,
                "drop": d,
                "p_c": pc,
                "reject_sequential": rs,
                "se": se(rs, sims),
                "reject_sequential_exact": oc["regression"],
                "reject_fixed_exact": fixed,
                "expected_episodes": en,
                "expected_episodes_exact": oc["expected_pairs"],
                "saved_fraction": 1 - oc["expected_pairs"] / n,
                "design": {
                    "looks": list(design.looks),
                    "regression_bounds": list(design.regression_bounds),
                    "pass_bounds": list(design.pass_bounds),
                    "regression_spent": list(design.regression_spent),
                },
            }
            out["sequential"].append(row)
            print(
                f"{n:>6}{d:>11.3f}{pc:>6.2f}{rs:>11.4f}{oc['reject']:>9.4f}{fixed:>14.4f}"
                f"{en:>12.1f}{oc['expected_pairs']:>9.1f}{row['saved_fraction']:>8.1%}"
            )
    out["seconds"] = time.time() - t0
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {a.json} ({out['seconds']:.0f} s)")
    worst = max(r["rate"] - 3 * r["se"] for r in out["false_fail"])
    seq_ff = [r for r in out["sequential"] if abs(r["drop"] - delta) < 1e-12]
    worst_seq = max(max(r["reject_sequential"] - 3 * r["se"], r["reject_sequential_exact"]) for r in seq_ff)
    ok = worst <= alpha and worst_seq <= alpha
    print("false-fail <= alpha (within 3 SE):", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
