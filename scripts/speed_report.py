#!/usr/bin/env python
"""docs/speed.md's H200 tables from the JSON of scripts/gpu_speed_job.py (and scripts/libero_throughput.py).

    python scripts/speed_report.py docs/results/speed/gpu_speed.json \
        [--throughput docs/results/speed/libero_throughput.json ...]

Prints markdown: the run's device and versions, the bf16 call (reference vs fast, eager vs graphed, plus the
short-query and compiled variants when the JSON has them), the W4A8 stages (ratios to the fast bf16 call, memory
before/after and deployed), the LIBERO runs, and issue 14's targets (the best figure measured for each, met or
not; the W4A8 ratios against the fastest bf16 call measured, compiled included). A stage the run did not reach
or that failed is listed as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MB = 1e6


def _ms(cell) -> str:
    if isinstance(cell, dict) and "median_ms" in cell:
        return f"{cell['median_ms']:.1f}"
    if isinstance(cell, dict) and "error" in cell:
        return "error"
    return "—"


def calls_table(st: dict) -> list[str]:
    calls = st.get("calls") or {}
    compiled = st.get("compiled") or {}
    cols = ["reference_eager", "reference_graph", "fast_eager", "fast_graph", "fast_short_query_graph"]
    labels = ["reference eager", "reference graphed", "fast eager", "fast graphed", "fast graphed, short-query attn"]
    extra = sorted({k.rsplit("_b", 1)[0] for k in compiled if "_b" in k})
    head = ["batch", *labels, *(f"fast graphed, compiled step + prefix ({v[:-4]})" if v.endswith("_all")
                                else f"fast graphed, compiled step ({v})" for v in extra)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b, row in sorted(calls.items(), key=lambda kv: int(kv[0][1:])):
        cells = [_ms(row.get(c)) for c in cols]
        cells += [_ms((compiled.get(f"{v}_{b}") or {}).get("timing")) for v in extra]
        out.append(f"| {b[1:]} | " + " | ".join(cells) + " |")
    return out


def quantized_table(st: dict) -> list[str]:
    head = ["stage", "layers", "quantize s", "b1 graphed ms (ratio)", "b8 graphed ms (ratio)",
            "compiled b1 (ratio)", "allocated Δ vs bf16 (MB)", "deployed Δ vs bf16 (MB)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, q in st.items():
        if not name.startswith("quantized"):
            continue

        def cell(b, key="graph", ratio="ratio_to_fast_bf16_graph", q=q):
            row = q.get(b) or {}
            r = row.get(ratio)
            return _ms(row.get(key)) + (f" ({r:.3f}×)" if isinstance(r, float) else "")

        saved = q.get("memory_allocated_saved_bytes")
        dep = q.get("memory_allocated_saved_deployed_bytes")
        out.append(
            f"| {name} | {q.get('layers', '—')} | {q.get('quantize_s', '—')} | {cell('b1')} | {cell('b8')} | "
            f"{cell('b1', 'compiled_graph', 'ratio_to_best_bf16_graph')} | "
            f"{'—' if saved is None else f'{-saved / MB:+.0f}'} | {'—' if dep is None else f'{-dep / MB:+.0f}'} |"
        )
    return out


# issue 14's targets (H200): docs/speed.md
TARGETS = {"bf16_b1_ms": 20.0, "bf16_b8_ms": 60.0, "expert_w4a8_ratio": 0.9, "lm_expert_w4a8_ratio": 0.75,
           "deployed_saving_bytes": 0.4 * 2**30, "expert_resident_ratio": 0.3, "libero_episodes_per_hour": 4000}


def _median(cell):
    return cell.get("median_ms") if isinstance(cell, dict) else None


def best_bf16_ms(st: dict, b: str) -> float | None:
    """The fastest bf16 call measured at batch ``b`` ('b1'): graphed fast path, short-query, or compiled."""
    row = (st.get("calls") or {}).get(b) or {}
    cands = [_median(row.get(k)) for k in ("fast_graph", "fast_short_query_graph")]
    cands += [_median(v.get("timing")) for k, v in (st.get("compiled") or {}).items() if k.endswith(f"_{b}")]
    cands = [c for c in cands if c]
    return min(cands) if cands else None


def best_quantized_ms(q: dict, b: str) -> float | None:
    row = q.get(b) or {}
    cands = [_median(v) for k, v in row.items() if not k.startswith("ratio") and k != "eager"]
    cands = [c for c in cands if c]
    return min(cands) if cands else None


def _expert_resident_ratio(q: dict) -> float | None:
    kinds = (q.get("resident_bytes_deployed") or {}).get("by_kind") or {}
    quant = sum(kinds.get(k, 0) for k in ("packed weight codes", "weight scales", "transforms"))
    before = q.get("report_bytes_before")
    return quant / before if quant and before else None


def targets_table(st: dict, tps: list[dict]) -> list[str]:
    """Each of issue 14's targets: the best figure this run measured, the target, met or not."""
    rows = []

    def row(name, value, target, fmt, met):
        rows.append(f"| {name} | {'not measured' if value is None else fmt.format(value)} | {target} | "
                    f"{'—' if value is None else ('**met**' if met else 'not met')} |")

    b1, b8 = best_bf16_ms(st, "b1"), best_bf16_ms(st, "b8")
    row("bf16 call, batch 1 (ms, best graphed)", b1, "≤ 20", "{:.1f}", b1 is not None and b1 <= TARGETS["bf16_b1_ms"])
    row("bf16 call, batch 8 (ms, best graphed)", b8, "≤ 60", "{:.1f}", b8 is not None and b8 <= TARGETS["bf16_b8_ms"])
    for name, q in st.items():
        if not name.startswith("quantized"):
            continue
        limit = TARGETS["lm_expert_w4a8_ratio" if name.startswith("quantized_lm") else "expert_w4a8_ratio"]
        for b, best in (("b1", b1), ("b8", b8)):
            qm = best_quantized_ms(q, b)
            ratio = qm / best if qm and best else None
            row(f"{name} vs the best bf16 call, batch {b[1:]} (×)", ratio, f"≤ {limit}", "{:.2f}",
                ratio is not None and ratio <= limit)
        dep = q.get("memory_allocated_saved_deployed_bytes")
        row(f"{name}: allocated memory saved, deployed (GiB)", None if dep is None else dep / 2**30, "≥ 0.4",
            "{:.3f}", dep is not None and dep >= TARGETS["deployed_saving_bytes"])
        if not name.startswith("quantized_lm"):
            r = _expert_resident_ratio(q)
            row(f"{name}: expert weights resident vs bf16 (×)", r, "≤ 0.3", "{:.3f}",
                r is not None and r <= TARGETS["expert_resident_ratio"])
    eph = [r.get("episodes_per_hour") for tp in tps for r in tp.get("runs", []) if r.get("episodes_per_hour")]
    best = max(eph) if eph else None
    row("LIBERO episodes/h (full pi05, 1 GPU + 16 cores; best run)", best, "≥ 4000", "{:.0f}",
        best is not None and best >= TARGETS["libero_episodes_per_hour"])
    return ["| what | measured | target | status |", "|---|---|---|---|", *rows]


def _per_hour(value) -> str:
    return "—" if value is None else f"{value:.0f}"


def throughput_table(tp: dict) -> list[str]:
    head = ["workers", "max batch", "episodes", "wall s", "episodes/h", "after the first wave", "policy ms/call",
            "mean batch", "sim ms/step"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in tp.get("runs", []):
        out.append(
            f"| {r.get('workers')} | {r.get('max_batch') or '—'} | {r.get('episodes')} | {r.get('wall_s', 0):.1f} | "
            f"{r.get('episodes_per_hour', 0):.0f} | {_per_hour(r.get('steady_episodes_per_hour'))} | "
            f"{r.get('policy_ms_per_call', 0):.1f} | "
            f"{r.get('mean_batch', 0):.1f} | {r.get('sim_ms_per_step', 0):.1f} |"
        )
    if not tp.get("finished"):
        out.append("")
        out.append("(the run did not finish: only the runs above completed)")
    return out


def report(speed: dict, tps: list[dict] | None = None) -> str:
    m = speed.get("meta", {})
    st = speed.get("stages", {})
    lines = [f"{m.get('gpu', m.get('device'))}, torch {m.get('torch')}, CUDA {m.get('cuda')}, Triton "
             f"{m.get('triton')}, {m.get('date')}; variant {m.get('variant')} {m.get('dtype')}; "
             f"{'finished' if speed.get('finished') else 'cut before the end'}", ""]
    lines += ["**Calls** (median ms)", "", *calls_table(st), ""]
    lines += ["**W4A8**", "", *quantized_table(st), ""]
    if speed.get("errors"):
        lines += ["**Stage errors**: " + ", ".join(sorted(speed["errors"])), ""]
    for tp in tps or []:
        opts = [k for k in ("compile_step", "compile_prefix", "short_query", "fuse") if tp.get(k)]
        opts += [f"batch sizes {tp['batch_sizes']}"] if tp.get("batch_sizes") else []
        lines += [f"**LIBERO** ({tp.get('ckpt')}, preset {tp.get('preset')}{', ' if opts else ''}{', '.join(opts)})",
                  "", *throughput_table(tp), ""]
    full = [tp for tp in tps or [] if "pi05" in str(tp.get("ckpt")) or "random" in str(tp.get("ckpt"))]
    lines += ["**Issue 14's targets**", "", *targets_table(st, full), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("speed", help="gpu_speed.json")
    p.add_argument("--throughput", action="append", default=[],
                   help="libero_throughput.json (repeat for several runs)")
    args = p.parse_args(argv)
    try:
        speed = json.loads(Path(args.speed).read_text())
        tps = [json.loads(Path(f).read_text()) for f in args.throughput]
    except (OSError, json.JSONDecodeError) as exc:
        print(f"speed_report: cannot read {exc}", file=sys.stderr)
        return 2
    print(report(speed, tps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
