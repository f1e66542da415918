#!/usr/bin/env python
"""docs/speed.md's H200 tables from the JSON of scripts/gpu_speed_job.py (and scripts/libero_throughput.py).

    python scripts/speed_report.py docs/results/speed/gpu_speed.json \
        [--throughput docs/results/speed/libero_throughput.json]

Prints markdown: the run's device and versions, the bf16 call (reference vs fast, eager vs graphed, plus the
short-query and compiled variants when the JSON has them), the W4A8 stages (ratios to the fast bf16 call, memory
before/after and deployed), and the LIBERO runs. A stage the run did not reach or that failed is listed as such.
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
    head = ["batch", *labels, *(f"fast graphed, compiled step ({v})" for v in extra)]
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


def throughput_table(tp: dict) -> list[str]:
    head = ["workers", "max batch", "episodes", "wall s", "episodes/h", "policy ms/call", "mean batch",
            "sim ms/step"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in tp.get("runs", []):
        out.append(
            f"| {r.get('workers')} | {r.get('max_batch') or '—'} | {r.get('episodes')} | {r.get('wall_s', 0):.1f} | "
            f"{r.get('episodes_per_hour', 0):.0f} | {r.get('policy_ms_per_call', 0):.1f} | "
            f"{r.get('mean_batch', 0):.1f} | {r.get('sim_ms_per_step', 0):.1f} |"
        )
    if not tp.get("finished"):
        out.append("")
        out.append("(the run did not finish: only the runs above completed)")
    return out


def report(speed: dict, tp: dict | None = None) -> str:
    m = speed.get("meta", {})
    st = speed.get("stages", {})
    lines = [f"{m.get('gpu', m.get('device'))}, torch {m.get('torch')}, CUDA {m.get('cuda')}, Triton "
             f"{m.get('triton')}, {m.get('date')}; variant {m.get('variant')} {m.get('dtype')}; "
             f"{'finished' if speed.get('finished') else 'cut before the end'}", ""]
    lines += ["**Calls** (median ms)", "", *calls_table(st), ""]
    lines += ["**W4A8**", "", *quantized_table(st), ""]
    if speed.get("errors"):
        lines += ["**Stage errors**: " + ", ".join(sorted(speed["errors"])), ""]
    if tp is not None:
        lines += ["**LIBERO**", "", *throughput_table(tp), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("speed", help="gpu_speed.json")
    p.add_argument("--throughput", default=None, help="libero_throughput.json")
    args = p.parse_args(argv)
    try:
        speed = json.loads(Path(args.speed).read_text())
        tp = json.loads(Path(args.throughput).read_text()) if args.throughput else None
    except (OSError, json.JSONDecodeError) as exc:
        print(f"speed_report: cannot read {exc}", file=sys.stderr)
        return 2
    print(report(speed, tp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
