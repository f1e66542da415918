"""GPU benchmarks (pytest-benchmark, marker gpu): per expert shape x M x preset, bf16 F.linear vs the
simulated path vs the real W4A8 kernel; the whole action-expert denoising call (18 layers, 10 steps).

Each benchmark times CUDA-graph replays of many calls (weights cycled so they stream from HBM as in the
real 126-layer expert); stats are per replay, `extra_info` has the per-call µs and the ratio to bf16
measured in the same session. Save with --benchmark-json / --benchmark-autosave and gate a regression
with --benchmark-compare --benchmark-compare-fail=median:10%.

    PYTHONPATH=. python -m pytest suites/bench -m gpu --benchmark-json=bench.json
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
MS = (1, 16, 50, 64, 256, 800, 4096)
SHAPES = [(1024, 2048), (1024, 256), (2048, 1024), (1024, 4096), (4096, 1024)]
IMPLS = [("bf16", "-"), ("sim", "A"), ("w4a8", "A"), ("sim", "B"), ("w4a8", "B")]
_BF16_US: dict = {}


@pytest.fixture(scope="module")
def kb():
    pytest.importorskip("triton", reason="triton is not installed")
    from pytest_duquant.kernels import bench, triton_kernels

    return bench, triton_kernels


def _layer_fn(kb, impl, preset, k, n, m):
    bench, tk = kb
    lay = bench.synth_layer(k, n, "A" if preset == "-" else preset, bias=False)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if impl == "bf16":
        ws = [lay.weight] + [lay.weight.clone() for _ in range(min(bench.copies_for(2 * n * k), 512) - 1)]
        return (lambda i: F.linear(x, ws[i])), len(ws)
    if impl == "sim":
        ps = [lay.sim] + [
            dataclasses.replace(lay.sim, weight=lay.sim.weight.clone())
            for _ in range(min(bench.copies_for(2 * n * k), 512) - 1)
        ]
        return (lambda i: tk.simulated_linear(x, ps[i])), len(ps)
    ps = [lay.w4a8] + [
        dataclasses.replace(lay.w4a8, w_packed=lay.w4a8.w_packed.clone())
        for _ in range(min(bench.copies_for(n * k // 2), 512) - 1)
    ]
    return (lambda i: tk.w4a8_linear(x, ps[i])), len(ps)


def _bf16_us(kb, k, n, m):
    if (k, n, m) not in _BF16_US:
        fn, copies = _layer_fn(kb, "bf16", "-", k, n, m)
        _BF16_US[(k, n, m)] = kb[0].graph_time_us(fn, copies)
    return _BF16_US[(k, n, m)]


def _run(benchmark, g, calls):
    def replay():
        g.replay()
        torch.cuda.synchronize()

    benchmark.pedantic(replay, rounds=15, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("m", MS, ids=[f"M{m}" for m in MS])
@pytest.mark.parametrize("k,n", SHAPES, ids=[f"{k}to{n}" for k, n in SHAPES])
@pytest.mark.parametrize("impl,preset", IMPLS, ids=[f"{i}-{p}" for i, p in IMPLS])
def test_layer(benchmark, kb, impl, preset, k, n, m):
    bench, tk = kb
    fn, copies = _layer_fn(kb, impl, preset, k, n, m)
    us = bench.graph_time_us(fn, copies)
    g, calls = bench.capture(fn, copies)
    _run(benchmark, g, calls)
    base = _bf16_us(kb, k, n, m)
    benchmark.group = f"layer {k}->{n} M={m}"
    benchmark.extra_info.update(
        impl=impl,
        preset=preset,
        k=k,
        n=n,
        m=m,
        calls_per_round=calls,
        per_call_us=round(us, 3),
        bf16_us=round(base, 3),
        ratio_to_bf16=round(us / base, 4),
        config=tk.pick_config(m, n, k).tag() if impl == "w4a8" else "",
    )


EXPERT = [("bf16", "A")] + [(mode, p) for mode in ("w4a8", "w4a8-grouped-geglu") for p in ("A", "B")] + [("sim", "A")]
_EXPERT_BF16: dict = {}


@pytest.mark.parametrize("tokens", (50,))
@pytest.mark.parametrize("mode,preset", EXPERT, ids=[f"{m}-{p}" for m, p in EXPERT])
def test_expert_denoise(benchmark, kb, mode, preset, tokens):
    """The whole action-expert denoising call (18 Gemma-300M layers, 10 Euler steps) in one CUDA graph."""
    bench, _ = kb
    if tokens not in _EXPERT_BF16:
        ref = bench.ExpertStack("bf16")
        _EXPERT_BF16[tokens] = (bench.time_denoise(ref, tokens), ref.weight_bytes())
        del ref
    stack = bench.ExpertStack(mode, preset)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    us = bench.graph_time_us(lambda i: stack.denoise(x), 1, reps=7, max_calls=1)
    g, _ = bench.capture(lambda i: stack.denoise(x), 1, max_calls=1)
    _run(benchmark, g, 1)
    base_us, base_bytes = _EXPERT_BF16[tokens]
    benchmark.group = f"expert denoise tokens={tokens}"
    benchmark.extra_info.update(
        mode=mode,
        preset=preset,
        tokens=tokens,
        per_call_us=round(us, 1),
        bf16_us=round(base_us, 1),
        ratio_to_bf16=round(us / base_us, 4),
        weight_bytes=stack.weight_bytes(),
        memory_ratio_bf16_over_this=round(base_bytes / stack.weight_bytes(), 3),
    )
    del g
    torch.cuda.empty_cache()
