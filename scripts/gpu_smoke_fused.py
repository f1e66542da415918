#!/usr/bin/env python3
"""Fast pre-check before the long device run: the one-launch small-M kernel on every expert shape
(M=50, presets A/B, fp32 and int8-codes hand-off) vs the float reference, then graph-timed vs bf16
(weights resident in L2 here: a quick look, not the benchmark). Exit 1 on error."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pytest_duquant.kernels import reference as ref  # noqa: E402
from pytest_duquant.kernels import triton_kernels as tk  # noqa: E402
from pytest_duquant.kernels.bench import EXPERT_SHAPES, graph_time_us, synth_layer  # noqa: E402

bad = 0
for preset in ("A", "B"):
    for k, n in EXPERT_SHAPES:
        lay = synth_layer(k, n, preset)
        x = torch.randn(50, k, device="cuda", dtype=torch.bfloat16)
        expect = ref.w4a8_linear_ref(x, lay.w4a8)
        t_bf = graph_time_us(lambda i, x=x, w=lay.weight: F.linear(x, w), 1, reps=5, max_calls=64)
        for codes in (False, True):
            cfg = tk.fused_small_config(50, n, k, codes=codes)
            y = tk.w4a8_linear(x, lay.w4a8, cfg)
            torch.cuda.synchronize()
            rel = float((y.double() - expect).norm() / expect.norm())
            t = graph_time_us(
                lambda i, x=x, p=lay.w4a8, c=cfg: tk.w4a8_linear(x, p, c), 1, reps=5, max_calls=64
            )
            ok = rel <= 1e-2 and bool(torch.isfinite(y).all())
            bad += not ok
            print(
                f"{preset} {k}->{n} {cfg.tag()}: rel {rel:.2e} {'ok' if ok else 'FAIL'}  {t:.1f} us "
                f"(bf16 in L2 {t_bf:.1f})",
                flush=True,
            )
print("barrier", tk._barrier("cuda").tolist())
sys.exit(1 if bad else 0)
