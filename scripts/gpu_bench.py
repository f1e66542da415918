#!/usr/bin/env python3
"""One device call: GPU correctness tests, per-layer timings (bf16 / simulated / W4A8), config sweep,
whole-expert denoising (bf16 vs W4A8), memory; prints a table and writes JSON to $OUT (or ./results).

    PYTHONPATH=. python3 scripts/gpu_bench.py [--sweep] [--no-tests] [--bench-suite] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_duquant.kernels import triton_kernels as tk  # noqa: E402
from pytest_duquant.kernels.bench import (  # noqa: E402
    EXPERT_SHAPES,
    ExpertStack,
    copies_for,
    graph_time_us,
    synth_layer,
    time_denoise,
)
from pytest_duquant.kernels.packs import SMALL_M  # noqa: E402
from pytest_duquant.kernels.stages import linear_stages  # noqa: E402
from pytest_duquant.testing import pytest_plugin_args  # noqa: E402

MS = (1, 16, 50, 64, 256, 800, 4096)
OUT = Path(os.environ.get("OUT", "results"))


def sweep_configs(m: int, k: int, n: int):
    n_kt = k // 128
    cands = []
    if m <= SMALL_M:
        for bt in (16, 32, 64):
            if bt > 16 and m <= 16:
                continue
            for sk in (1, 2, 4, 8):
                if n_kt % sk == 0:
                    for st in (1, 4) if bt == 32 else (4,):
                        cands.append(tk.small_config(m, n, k, bt=bt, split=sk, stages=st))
    elif m <= 256:
        for sk in (1, 2, 4):
            cands.append(
                tk.GemmConfig(path="S", bm=64, bn=64, split_k=sk, warps=4, stages=4, act_bm=32, swap=True)
            )
            cands.append(
                tk.GemmConfig(path="S", bm=64, bn=128, split_k=sk, warps=4, stages=4, act_bm=32, swap=True)
            )
        for bm, bn, w in ((64, 64, 4), (128, 128, 8)):
            for sk in (1, 2):
                cands.append(tk.GemmConfig(path="S", bm=bm, bn=bn, split_k=sk, warps=w, stages=3, act_bm=32))
    else:
        for bm, bn, w, st in (
            (128, 128, 8, 3),
            (128, 256, 8, 3),
            (128, 128, 4, 4),
            (64, 128, 4, 4),
            (256, 128, 8, 3),
        ):
            cands.append(tk.GemmConfig(path="Q", bm=bm, bn=bn, split_k=1, warps=w, stages=st, act_bm=64))
        for abm, aw in ((32, 4), (128, 8), (64, 8)):  # activation-pass tile
            cands.append(
                tk.GemmConfig(
                    path="Q", bm=128, bn=128, split_k=1, warps=8, stages=3, act_bm=abm, act_warps=aw
                )
            )
    return cands


def layer_copies(lay, n_bytes_fn):
    """Copies of the weight tensor only (timing: stream weights from HBM like a 126-layer expert)."""
    return copies_for(n_bytes_fn(lay))


def time_layer(k, n, m, preset, sweep: bool):
    lay = synth_layer(k, n, preset, bias=False)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    # bf16 F.linear
    cb = copies_for(lay.weight.numel() * 2)
    wb = [lay.weight] + [lay.weight.clone() for _ in range(min(cb, 512) - 1)]
    t_bf16 = graph_time_us(lambda i: F.linear(x, wb[i]), len(wb))
    wb.clear()
    # simulated
    cs = copies_for(lay.sim.weight.numel() * 2)
    sims = [lay.sim] + [
        dataclasses.replace(lay.sim, weight=lay.sim.weight.clone()) for _ in range(min(cs, 512) - 1)
    ]
    t_sim = graph_time_us(lambda i: tk.simulated_linear(x, sims[i]), len(sims))
    sims.clear()
    # W4A8
    cw = copies_for(lay.w4a8.w_packed.numel())
    packs = [lay.w4a8] + [
        dataclasses.replace(lay.w4a8, w_packed=lay.w4a8.w_packed.clone()) for _ in range(min(cw, 512) - 1)
    ]
    pick = tk.pick_config(m, n, k)
    t_w4 = graph_time_us(lambda i: tk.w4a8_linear(x, packs[i], pick), len(packs))
    # split: activation kernel alone and GEMM alone (same config), by the stages the model path runs
    act, gemm = linear_stages(x, lay.w4a8, pick, tk)
    operands = act()
    t_act = graph_time_us(lambda i: act(), 1)
    t_gemm = graph_time_us(lambda i: gemm(operands, packs[i]), len(packs))
    t_prev = None
    if pick.swap:  # small M: path C (codes) for comparison
        prev = dataclasses.replace(pick, path="C")
        t_prev = graph_time_us(lambda i: tk.w4a8_linear(x, packs[i], prev), len(packs))
    best = (t_w4, pick.tag())
    sweep_rows = []
    if sweep:
        for cfg in sweep_configs(m, k, n):
            try:
                t = graph_time_us(lambda i, cfg=cfg: tk.w4a8_linear(x, packs[i], cfg), len(packs), reps=7)
            except Exception as exc:  # a config that does not compile/fit is recorded, not fatal
                sweep_rows.append((cfg.tag(), None, repr(exc)[:120]))
                continue
            sweep_rows.append((cfg.tag(), t, ""))
            if t < best[0]:
                best = (t, cfg.tag())
    packs.clear()
    w_bytes = k * n // 2
    return dict(
        k=k,
        n=n,
        m=m,
        preset=preset,
        bf16_us=t_bf16,
        sim_us=t_sim,
        w4a8_us=t_w4,
        w4a8_act_us=t_act,
        w4a8_gemm_us=t_gemm,
        prev_two_launch_us=t_prev,
        cfg=pick.tag(),
        best_us=best[0],
        best_cfg=best[1],
        sim_ratio=t_sim / t_bf16,
        w4a8_ratio=t_w4 / t_bf16,
        gemm_GBps=(w_bytes + m * k + m * n * 2) / (t_gemm * 1e-6) / 1e9,
        gemm_TOPS=2 * m * n * k / (t_gemm * 1e-6) / 1e12,
        sweep=sweep_rows,
    )


GROUPS = {"qkv": (1024, (2048, 256, 256)), "gate_up": (1024, (4096, 4096))}


def time_group(name: str, preset: str, m: int) -> dict:
    """Linears sharing one input: bf16 (one F.linear per member) vs W4A8 one member at a time vs the
    W4A8Group (one activation + one GEMM launch)."""
    from pytest_duquant.kernels.packs import make_w4a8_group

    k, widths = GROUPS[name]
    layers = [synth_layer(k, n, preset, bias=False) for n in widths]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    cb = copies_for(sum(lay.weight.numel() * 2 for lay in layers))
    wsets = [[lay.weight] + [lay.weight.clone() for _ in range(min(cb, 256) - 1)] for lay in layers]
    t_bf16 = graph_time_us(lambda i: [F.linear(x, ws[i]) for ws in wsets], len(wsets[0]))
    wsets.clear()
    grp = make_w4a8_group([lay.w4a8 for lay in layers])
    cw = copies_for(grp.w_packed.numel())
    grps = [grp] + [dataclasses.replace(grp, w_packed=grp.w_packed.clone()) for _ in range(min(cw, 256) - 1)]
    t_members = graph_time_us(
        lambda i: [tk.w4a8_linear(x, dataclasses.replace(p, w_packed=grps[i].w_packed)) for p in grp.packs],
        len(grps),
    )
    t_group = graph_time_us(lambda i: tk.w4a8_small(x, grps[i]), len(grps))
    return dict(
        group=name,
        preset=preset,
        m=m,
        bf16_us=t_bf16,
        w4a8_members_us=t_members,
        w4a8_group_us=t_group,
        group_ratio=t_group / t_bf16,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--bench-suite", action="store_true", help="also run suites/bench with pytest-benchmark")
    ap.add_argument("--quick", action="store_true", help="M in {50, 4096}, preset A only")
    ap.add_argument("--presets", default="A,B")
    ap.add_argument("--sweep-min-m", type=int, default=0)
    ap.add_argument("--sweep-max-m", type=int, default=1 << 30)
    ap.add_argument("--sweep-presets", default="A")
    ap.add_argument("--sweep-ms", default="", help="comma-separated M values to sweep (overrides min/max)")
    ap.add_argument("--ms", default="", help="comma-separated M list for the layer table (default: all)")
    ap.add_argument("--test-k", default="", help="pytest -k expression for the GPU tests (default: all)")
    ap.add_argument("--test-workers", type=int, default=0, help="pytest-xdist workers for the GPU tests")
    ap.add_argument("--suite-k", default="", help="pytest -k expression for the bench suite (default: all)")
    ap.add_argument("--budget-s", type=float, default=560, help="stop the bench suite by this many seconds")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import triton

    info = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv),
    )
    print(json.dumps(info), flush=True)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), PYTHONUNBUFFERED="1")
    if not args.no_tests:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                *pytest_plugin_args(),
                "tests/kernels",
                "-q",
                "--maxfail=10",
                "-p",
                "no:cacheprovider",
                "-m",
                "gpu",
                "-W",
                "ignore",
                "-rf",
                "--timeout=240",  # a hung kernel (e.g. a launch barrier) fails its test instead of the call
                "--timeout-method=thread",
            ]
            + (["-k", args.test_k] if args.test_k else [])
            + (["-n", str(args.test_workers)] if args.test_workers else []),
            capture_output=True,
            text=True,
            env=env,
        )
        (OUT / "pytest_gpu.log").write_text(r.stdout + r.stderr)
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        print("\n".join(tail), flush=True)
        info["tests_rc"] = r.returncode
        print(f"[{time.time() - t0:.0f}s] tests rc={r.returncode}", flush=True)
    expert = []
    groups = []
    for preset in ("A", "B"):
        for name in GROUPS:
            g = time_group(name, preset, 50)
            groups.append(g)
            print(f"[{time.time() - t0:.0f}s] group {g}", flush=True)
    expert_modes = [("bf16", "A")] + [
        (mode, preset)
        for preset in ("A", "B")
        for mode in ("w4a8", "w4a8-grouped", "w4a8-grouped-geglu", "w4a8-grouped-codes")
    ] + [("sim", "A")]
    for tokens in (50, 400):
        res = {"tokens": tokens}
        for mode, preset in expert_modes:
            if tokens > SMALL_M and mode.startswith("w4a8-grouped"):
                continue  # the same kernels as "w4a8" above 64 tokens
            stack = ExpertStack(mode, preset)
            res[f"{mode}_{preset}_us"] = time_denoise(stack, tokens)
            res[f"{mode}_{preset}_bytes"] = stack.weight_bytes()
            del stack
            torch.cuda.empty_cache()
        expert.append(res)
        print(f"[{time.time() - t0:.0f}s] expert denoise tokens={tokens}: {res}", flush=True)
    rows = []
    ms = (50, 4096) if args.quick else (tuple(int(v) for v in args.ms.split(",")) if args.ms else MS)
    presets = ("A",) if args.quick else tuple(args.presets.split(","))
    for preset in presets:
        for k, n in EXPERT_SHAPES:
            for m in ms:
                row = time_layer(
                    k,
                    n,
                    m,
                    preset,
                    args.sweep
                    and preset in args.sweep_presets.split(",")
                    and (
                        m in [int(v) for v in args.sweep_ms.split(",")]
                        if args.sweep_ms
                        else args.sweep_min_m <= m <= args.sweep_max_m
                    ),
                )
                rows.append(row)
                (OUT / "gpu_bench.json").write_text(
                    json.dumps(dict(info=info, layers=rows, expert=expert, groups=groups), indent=1)
                )
                print(
                    f"[{time.time() - t0:.0f}s] {preset} {k}->{n} M={m}: bf16 {row['bf16_us']:.1f} "
                    f"sim {row['sim_us']:.1f} w4a8 {row['w4a8_us']:.1f} (act {row['w4a8_act_us']:.1f} + gemm "
                    f"{row['w4a8_gemm_us']:.1f}) best {row['best_us']:.1f} {row['best_cfg']}",
                    flush=True,
                )
    (OUT / "gpu_bench.json").write_text(
        json.dumps(dict(info=info, layers=rows, expert=expert, groups=groups), indent=1)
    )
    # ---- table ----
    print(f"\n{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['date']}")
    print("preset shape        M     bf16us   sim us (x)      w4a8 us (x)     act+gemm    best(cfg)")
    for r in rows:
        print(
            f"{r['preset']:>2} {r['k']:>5}->{r['n']:<5} {r['m']:>5} {r['bf16_us']:8.1f} {r['sim_us']:7.1f} "
            f"({r['sim_ratio']:.2f}) {r['w4a8_us']:8.1f} ({r['w4a8_ratio']:.2f})  {r['w4a8_act_us']:5.1f}+"
            f"{r['w4a8_gemm_us']:6.1f}  {r['best_us']:.1f} {r['best_cfg']}"
            + (f"  pathC {r['prev_two_launch_us']:.1f}" if r.get("prev_two_launch_us") else "")
        )
    for g in groups:
        print(
            f"group {g['group']:8s} {g['preset']} M={g['m']}: bf16 {g['bf16_us']:.1f} us, W4A8 members "
            f"{g['w4a8_members_us']:.1f}, W4A8 group {g['w4a8_group_us']:.1f} ({g['group_ratio']:.2f}x)"
        )
    for e in expert:
        b = e["bf16_A_us"]
        parts = [
            f"{key[:-3]} {val:.0f} ({val / b:.2f}x)"
            for key, val in e.items()
            if key.endswith("_us") and key != "bf16_A_us"
        ]
        print(f"expert denoise (18 layers x 10 steps) tokens={e['tokens']}: bf16 {b:.0f} us; " + ", ".join(parts))
        mem = [
            f"{key[:-6]} {e['bf16_A_bytes'] / val:.2f}x"
            for key, val in e.items()
            if key.endswith("_bytes") and key != "bf16_A_bytes"
        ]
        print("  weight bytes, bf16 / mode: " + ", ".join(mem))
    if args.bench_suite:
        try:
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    *pytest_plugin_args(),
                    "suites/bench",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-m",
                    "gpu",
                    "-W",
                    "ignore",
                    f"--benchmark-json={OUT / 'bench_suite.json'}",
                    "--benchmark-columns=median,rounds",
                ]
                + (["-k", args.suite_k] if args.suite_k else []),
                capture_output=True,
                text=True,
                env=env,
                timeout=max(30.0, args.budget_s - (time.time() - t0)),
            )
            (OUT / "bench_suite.log").write_text(r.stdout + r.stderr)
            print("\n".join((r.stdout + r.stderr).strip().splitlines()[-6:]), flush=True)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            (OUT / "bench_suite.log").write_text(out)
            print("bench suite stopped at the time budget; partial log in bench_suite.log", flush=True)
    print(f"total {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
