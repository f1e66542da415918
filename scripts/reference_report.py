#!/usr/bin/env python
"""What quantization does to the reference policy's LIBERO success: table, figure, gate verdicts.

    python scripts/reference_report.py [--results docs/results/reference] [--golden golden] \\
        [--out docs/results/reference/quantization.json] [--png docs/reference-quantization.png]

Reads the results files of ``scripts/reference_eval.py`` (one per setting), judges each against the
committed FP golden with the project's judge (the same call ``duquant gate`` makes: paired exact test
on the golden's episodes that the setting ran; a preset's allowed drop from the golden, 0.05 for the
settings that are not presets), and writes a JSON summary, a markdown table (stdout) and a figure:
success with exact 95 % (Clopper-Pearson) intervals per setting, the FP golden's rate on the same
episodes and the gate's threshold (golden rate - allowed drop).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ORDER = ["fp", "precision", "A", "B", "speed", "rtn_w4a8", "w3", "w2", "rtn_w2"]
LABELS = {
    "fp": "FP (golden run)", "precision": "precision (W6A8)", "A": "A (W4A8, block 16)",
    "B": "B (W4A8, block 64)", "speed": "speed (W4A8, block 128)", "rtn_w4a8": "RTN W4A8 (no transforms)",
    "w3": "DuQuant W3A8 (A)", "w2": "DuQuant W2A8 (A)", "rtn_w2": "RTN W2A8 (sabotage)",
}
DEFAULT_DROP = 0.05


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) interval of a binomial proportion (bisection on the binomial tail)."""

    def tail_ge(p):  # P(X >= k)
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))

    def bisect(f, target):
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if f(mid) < target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else bisect(tail_ge, alpha / 2)
    # P(X <= k) falls as p grows: bisect its negation
    upper = 1.0 if k == n else bisect(lambda p: tail_ge(p) - math.comb(n, k) * p**k * (1 - p) ** (n - k) - 1,
                                      -alpha / 2)
    return lower, upper


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="docs/results/reference")
    p.add_argument("--golden", default="golden")
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--out", default="docs/results/reference/quantization.json")
    p.add_argument("--png", default="docs/reference-quantization.png")
    args = p.parse_args(argv)

    from pytest_duquant.golden.episodes import goldens_for
    from pytest_duquant.judge import judge
    from pytest_duquant.results import read_results

    rows = []
    golden = None
    for name in ORDER:
        path = Path(args.results) / f"{args.suite}_{name}.jsonl"
        if not path.is_file():
            continue
        records = read_results(path)
        if golden is None:
            golden = goldens_for(records, args.golden)[args.suite]
        tasks = sorted({r.task_id for r in records})
        run_episodes = len(records)
        # a run cut by its time limit is judged on the init states every task finished (and says so): the
        # gate itself never judges an incomplete plan (`duquant gate` calls it UNUSABLE)
        done = {(r.task_id, r.trial) for r in records}
        trials = sorted(t for t in {r.trial for r in records} if all((task, t) in done for task in tasks))
        records = [r for r in records if r.trial in trials]
        n = len(records)
        k = sum(bool(r.success) for r in records)
        gold = golden.outcomes()
        fp_k = sum(gold[r.key] for r in records)
        row = {"setting": name, "label": LABELS.get(name, name), "episodes": n, "successes": k,
               "rate": k / n, "ci95": clopper_pearson(k, n), "golden_successes_same_episodes": fp_k,
               "golden_rate_same_episodes": fp_k / n, "trials": _ids(trials),
               "tasks": f"{tasks[0]}-{tasks[-1]}", "run_episodes": run_episodes,
               "trial_ids": trials}
        if name != "fp":
            preset = records[0].preset
            delta = golden.allowed_drop.get(preset) if name in ("A", "B", "precision", "speed") else DEFAULT_DROP
            j = judge(records, {args.suite: golden}, allowed_drop=delta, tasks=tasks, trials=trials)
            sj = j.suites[0]
            d = sj.decision
            row.update({"allowed_drop": delta, "verdict": sj.outcome, "exit_code": j.exit_code,
                        "drop": None if d is None else d.drop, "drop_ci": None if d is None else list(d.ci),
                        "discordant": None if d is None else {"fp_only": d.b, "candidate_only": d.c},
                        "why": sj.reason})
        rows.append(row)
    if golden is None:
        print("no results found", file=sys.stderr)
        return 2
    summary = {"suite": args.suite, "golden_fingerprint": golden.fingerprint, "rows": rows}
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print("| setting | episodes (tasks × init states) | success | 95 % CI | golden FP on the same episodes | "
          "allowed drop | drop (95 % CI) | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ci = f"{100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f} %"
        if r["setting"] == "fp":
            extra = "| - | - | golden |"
        else:
            dci = r.get("drop_ci")
            dtxt = "-" if r.get("drop") is None else (
                f"{100 * r['drop']:+.1f} pt ({100 * dci[0]:+.1f}, {100 * dci[1]:+.1f})")
            extra = f"| {100 * r['allowed_drop']:.0f} pt | {dtxt} | **{r['verdict'].upper()}** |"
        cut = f", of {r['run_episodes']} run" if r["run_episodes"] != r["episodes"] else ""
        print(f"| {r['label']} | {r['episodes']} ({r['tasks']} × {_ids(r['trial_ids'])}{cut}) | "
              f"{r['successes']}/{r['episodes']} = "
              f"{100 * r['rate']:.1f} % | {ci} | {r['golden_successes_same_episodes']}/{r['episodes']} = "
              f"{100 * r['golden_rate_same_episodes']:.1f} % {extra}")
    draw(rows, args.png)
    return 0


def _ids(ids: list[int]) -> str:
    """0,1,2,5,6 -> '0-2,5-6'."""
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def draw(rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, r in enumerate(rows):
        lo, hi = r["ci95"]
        color = {"pass": "tab:green", "regression": "tab:red", "inconclusive": "tab:orange"}.get(
            r.get("verdict"), "tab:blue")
        ax.errorbar(i, 100 * r["rate"], yerr=[[100 * (r["rate"] - lo)], [100 * (hi - r["rate"])]], fmt="o",
                    color=color, capsize=4, lw=1.5)
        g = 100 * r["golden_rate_same_episodes"]
        ax.plot([i - 0.3, i + 0.3], [g, g], color="black", lw=1.2)
        if "allowed_drop" in r:
            t = g - 100 * r["allowed_drop"]
            ax.plot([i - 0.3, i + 0.3], [t, t], color="black", lw=1, ls=":")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['label']}\nn={r['episodes']}" for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("LIBERO-Object success (%)")
    ax.set_ylim(-2, 100)
    ax.set_title("reference policy under quantization: success (exact 95% CI), golden FP on the same "
                 "episodes (—), gate threshold (···)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], marker="o", ls="", color=c, label=lab) for c, lab in (
        ("tab:blue", "FP"), ("tab:green", "PASS"), ("tab:orange", "INCONCLUSIVE"), ("tab:red", "REGRESSION"))],
        fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(png, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
