#!/usr/bin/env python
"""How far each golden figure moves when only the order of float operations changes.

    python scripts/golden_spread.py --model minilm --presets A,B,precision,speed
    python scripts/golden_spread.py --model pi05 --ckpt /tmp/dq-ckpt --presets A,B,precision,speed
    python scripts/golden_spread.py --model minilm --dtype float32      # the old float32 measurement
    python scripts/golden_spread.py --model pi05 --dtype policy         # the dummy in its own float32

Each (preset, rotation) is measured by the model suite's probe (the same code the golden tests run) once per
float-order variant, each in a fresh process: the CPU's vector width as torch dispatches it
(ATEN_CPU_CAPABILITY=avx512/avx2/default), MKL's code path (MKL_CBWR=COMPATIBLE/AVX2: what another CPU
family or MKL build would take) and 2 threads instead of the probes' 1. Nothing else changes: same weights,
same settings, same inputs. For every figure the largest deviation from the baseline run is printed
(relative for output errors, dB for SQNR); the model goldens' tolerances are set from these numbers
(docs/model-suite.md, "Reproducibility").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: list[tuple[str, dict[str, str], int]] = [
    ("baseline", {}, 1),
    ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}, 1),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, 1),
    ("MKL_CBWR=AVX2", {"MKL_CBWR": "AVX2"}, 1),
    ("2 threads", {}, 2),
]


def _figures(m) -> dict[str, float]:
    out = {"output.rel_l2": m.output.rel_l2, "output.max_abs": m.output.max_abs, "mean_sqnr_db": m.mean_sqnr_db}
    for i, (r, a) in enumerate(zip(m.output.per_step_rel_l2, m.output.per_step_max_abs, strict=True)):
        out[f"output.step{i + 1}.rel_l2"] = r
        out[f"output.step{i + 1}.max_abs"] = a
    if m.output_rtn is not None:
        out["output_rtn.rel_l2"] = m.output_rtn.rel_l2
        out["output_rtn.max_abs"] = m.output_rtn.max_abs
        out["mean_rtn_sqnr_db"] = m.mean_rtn_sqnr_db
    for la in m.layers:
        out[f"layer:{la.name}"] = la.sqnr_db
        if la.rtn_sqnr_db is not None:
            out[f"layer_rtn:{la.name}"] = la.rtn_sqnr_db
    return out


def worker(args) -> None:
    import torch

    from pytest_duquant.config import from_env, replace

    if args.model == "minilm":
        from pytest_duquant.metrics.probe import MiniLMProbe

        probe = MiniLMProbe(dtype=getattr(torch, args.dtype), threads=args.threads)
    else:
        from pytest_duquant.metrics.probe import PolicyProbe
        from pytest_duquant.policies.session import policy_factory

        factory = policy_factory(args.ckpt)
        dtype = None if args.dtype == "policy" else getattr(torch, args.dtype)
        probe = PolicyProbe(factory(), fingerprint=factory.fingerprint, threads=args.threads, dtype=dtype)
    rows = {}
    for preset in args.presets.split(","):
        for rotation in args.rotations.split(","):
            cfg = replace(from_env({}, preset=preset), rotation=rotation)
            rows[f"{preset}/{rotation}"] = _figures(probe.measure(cfg, rtn=True))
    probe.close()
    print("JSON:" + json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "pi05"), default="minilm")
    ap.add_argument("--ckpt", default=None, help="pi05 checkpoint (default: the built-in dummy)")
    ap.add_argument("--presets", default="A,B,precision,speed")
    ap.add_argument("--rotations", default="svd,greedy")
    ap.add_argument("--dtype", default="float64",
                    help="probe dtype: float64 (the suite's for MiniLM and the dummy pi0.5), float32, or policy "
                    "(pi0.5 in its checkpoint's precision)")
    ap.add_argument("--out", default=None, help="write the deviations as JSON")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    runs = {}
    for label, env, threads in VARIANTS:
        cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--presets", args.presets,
               "--rotations", args.rotations, "--dtype", args.dtype, "--threads", str(threads)]
        if args.ckpt:
            cmd += ["--ckpt", args.ckpt]
        proc = subprocess.run(cmd, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("JSON:")]
        if proc.returncode or not line:
            print(f"{label}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        runs[label] = json.loads(line[0][5:])
        print(f"measured: {label} (cpu capability {runs[label]['capability']})", file=sys.stderr)
    base = runs["baseline"]["rows"]
    report: dict = {"model": args.model, "dtype": args.dtype, "variants": list(runs), "rows": {}}
    print(f"\n{args.model} ({args.dtype}): largest deviation from the baseline over {len(runs) - 1} float-order "
          "variants")
    print(f"{'preset/rotation':<20} {'rel_l2':>9} {'max_abs':>9} {'rtn rel':>9} {'rtn max':>9} "
          f"{'mean dB':>9} {'layer dB':>9} {'steps':>9}")
    for key, ref in base.items():
        dev: dict[str, float] = {}
        for run in runs.values():
            now = run["rows"][key]
            for fig, gold in ref.items():
                if fig.startswith("layer") or fig.startswith("mean"):
                    d = abs(now[fig] - gold)
                else:
                    d = abs(now[fig] - gold) / max(abs(gold), 1e-30)
                group = ("layer" if fig.startswith("layer:") else "layer_rtn" if fig.startswith("layer_rtn:")
                         else "steps" if ".step" in fig else fig)
                dev[group] = max(dev.get(group, 0.0), d)
        report["rows"][key] = dev
        print(f"{key:<20} {dev['output.rel_l2']:>9.2e} {dev['output.max_abs']:>9.2e} "
              f"{dev.get('output_rtn.rel_l2', 0):>9.2e} {dev.get('output_rtn.max_abs', 0):>9.2e} "
              f"{max(dev['mean_sqnr_db'], dev.get('mean_rtn_sqnr_db', 0)):>9.2e} "
              f"{max(dev['layer'], dev.get('layer_rtn', 0)):>9.2e} {dev.get('steps', 0):>9.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
