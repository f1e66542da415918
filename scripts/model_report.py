#!/usr/bin/env python
"""Per-preset action error and per-layer SQNR (DuQuant SVD / greedy vs plain RTN) for the FULL-SIZE random
pi0.5 (built in memory: SigLIP So400m + Gemma-2B + Gemma-300M expert, 126 expert linears) and for
all-MiniLM-L6-v2 (real trained weights). Prints markdown tables; writes model.png/.json/.md to --out.

CPU only. Runtime (2-core AMD EPYC, shared, bf16, 4 calibration + 4 evaluation observations, 4 presets x
2 rotations): see docs/model-suite.md (tens of minutes; the prefix of each observation is computed once and
reused, every preset runs its full CALIB_STEPS policy calls for DuQuant and for RTN).

    python scripts/model_report.py --out reports/model-full            # pi05 full size + MiniLM
    python scripts/model_report.py --variant dummy --out /tmp/r        # quick (built-in dummy checkpoint)
    python scripts/model_report.py --no-pi05 --out /tmp/r              # MiniLM only (~1 min)
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="reports/model-full")
    ap.add_argument("--variant", default="pi05", choices=("pi05", "dummy"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", default="A,B,precision,speed")
    ap.add_argument("--rotations", default="svd,greedy")
    ap.add_argument("--calib-obs", type=int, default=4)
    ap.add_argument("--eval-obs", type=int, default=4)
    ap.add_argument(
        "--sqnr-calls", type=int, default=8, help="calibration calls whose layer inputs feed SQNR"
    )
    ap.add_argument("--max-rows", type=int, default=1024, help="captured input rows per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-pi05", action="store_true")
    ap.add_argument("--no-minilm", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from pytest_duquant.config import canonical_preset
    from pytest_duquant.metrics.probe import EVAL_OBS_SEED, MiniLMProbe, PolicyProbe, collect_metrics, preset_configs
    from pytest_duquant.reporting.model import markdown_table, write_model_report

    presets = [canonical_preset(p) for p in args.presets.split(",") if p.strip()]
    configs = preset_configs(presets, [r.strip() for r in args.rotations.split(",") if r.strip()])
    start = time.perf_counter()

    def progress(msg):
        print(f"[{time.perf_counter() - start:7.1f}s] measuring {msg}", file=sys.stderr, flush=True)

    metrics, timings = [], {}
    if not args.no_pi05:
        from pytest_duquant.policies.pi05.processing import synthetic_observations
        from pytest_duquant.policies.session import (
            default_calibration_observations,
            policy_factory,
            random_policy,
        )

        t0 = time.perf_counter()
        if args.variant == "dummy" and args.seed == 0:
            make = policy_factory(None)
            policy, fingerprint = make(), make.fingerprint
        else:
            policy = random_policy(args.variant, args.seed, args.dtype)
            fingerprint = policy.fingerprint
        timings["build policy"] = time.perf_counter() - t0
        progress(f"{policy!r} built in {timings['build policy']:.0f}s")
        probe = PolicyProbe(
            policy,
            fingerprint=fingerprint,
            threads=args.threads,
            calib_obs=default_calibration_observations(args.calib_obs),
            eval_obs=synthetic_observations(args.eval_obs, EVAL_OBS_SEED),
            sqnr_calls=args.sqnr_calls,
            max_rows=args.max_rows,
        )
        t0 = time.perf_counter()
        probe.fp_states()
        timings["pi05 FP reference"] = time.perf_counter() - t0
        progress(f"FP reference done in {timings['pi05 FP reference']:.0f}s")
        t0 = time.perf_counter()
        metrics += collect_metrics(probe, configs, progress=progress)
        timings["pi05 presets"] = time.perf_counter() - t0
        probe.close()
        del probe, policy
    if not args.no_minilm:
        t0 = time.perf_counter()
        probe = MiniLMProbe(threads=args.threads)
        metrics += collect_metrics(probe, configs, progress=progress)
        timings["minilm presets"] = time.perf_counter() - t0
        probe.close()
    if not metrics:
        print("nothing measured", file=sys.stderr)
        return 2
    paths = write_model_report(metrics, args.out, focus=presets[0])
    print(
        f"\n## Model report ({datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"{args.threads} threads)\n"
    )
    print(f"command: python scripts/model_report.py {' '.join(argv or sys.argv[1:])}\n")
    print(markdown_table(metrics))
    print("\nper-layer SQNR by projection kind (mean dB, DuQuant / RTN):\n")
    print(kind_table(metrics))
    print(
        "\ntimings: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        + f"; total {time.perf_counter() - start:.0f}s"
    )
    for k, v in paths.items():
        print(f"wrote {k}: {v}")
    return 0


def kind_table(metrics) -> str:
    from pytest_duquant.reporting.model import KIND_ORDER, label_of

    kinds = [k for k in KIND_ORDER if any(la.kind == k for m in metrics for la in m.layers)]
    rows = ["| model | variant | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for m in metrics:
        cells = []
        for k in kinds:
            ls = [la for la in m.layers if la.kind == k]
            if not ls:
                cells.append("")
                continue
            dq = sum(la.sqnr_db for la in ls) / len(ls)
            rt = [la.rtn_sqnr_db for la in ls if la.rtn_sqnr_db is not None]
            cells.append(f"{dq:.1f} / {sum(rt) / len(rt):.1f}" if rt else f"{dq:.1f}")
        rows.append(f"| {m.model} | {label_of(m)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
