"""Time quantize_model on a full-size pi0.5 action expert (Gemma-300M: 18 layers x 7 linears) on this machine.

    python scripts/time_quantize.py [--presets A,B,precision,speed] [--dtype bfloat16] [--out FILE.json]

Builds only the expert (random weights, the openpi module names), so it fits any CPU box. Each preset
runs twice: a cold run (packs computed) and a warm run (packs from the cache). Wall and CPU seconds are
printed: on a shared machine the wall time depends on the neighbours, the CPU time much less.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
import time

import torch
from torch import nn

from pytest_duquant.config import from_env, replace
from pytest_duquant.policies.pi05.configuration import GEMMA_VARIANTS
from pytest_duquant.policies.pi05.modeling import GemmaForCausalLM, GemmaModel
from pytest_duquant.quantize import quantize_model


def expert_only(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    root = nn.Module()
    root.paligemma_with_expert = nn.Module()
    root.paligemma_with_expert.gemma_expert = GemmaForCausalLM(
        GemmaModel(GEMMA_VARIANTS["gemma_300m"], vocab_size=None, eps=1e-6, rope_theta=10_000.0, adaptive=True)
    )
    for m in root.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
    return root.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="A,B,precision,speed")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for preset in args.presets.split(","):
        packdir = tempfile.mkdtemp(prefix="dq-time-")
        cfg = replace(from_env({}, preset=preset), packdir=packdir)
        for run in ("cold", "warm"):
            model = expert_only(dtype)
            t0, c0 = time.perf_counter(), time.process_time()
            report = quantize_model(model, cfg)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows.append({"preset": preset, "run": run, "layers": len(report.layers), "seconds": round(seconds, 2),
                         "cpu_seconds": round(cpu, 2), "mib_before": round(report.bytes_before / 2**20, 1),
                         "mib_after": round(report.bytes_after / 2**20, 1)})
            print(f"{preset:<10} {run:<5} {len(report.layers):>4} layers {seconds:>7.2f} s (cpu {cpu:6.2f} s) "
                  f"{report.bytes_before / 2**20:>7.1f} MiB -> {report.bytes_after / 2**20:>6.1f} MiB")
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
