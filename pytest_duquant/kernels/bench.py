"""GPU timing helpers and synthetic layers / an expert-shaped stack for the kernel benchmarks.

Timing: a CUDA graph captures `calls` invocations (cycling through weight copies so that the weights do
not sit in L2, as in a real 126-layer expert), replays are timed with CUDA events, the median replay time
divided by `calls` is the per-call time. Graphs remove the Python/launch overhead from both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pytest_duquant.kernels.packs import SMALL_M, SimPack, W4A8Pack, make_sim_pack, make_w4a8_pack

EXPERT_SHAPES = ((1024, 2048), (1024, 256), (2048, 1024), (1024, 4096), (4096, 1024))  # (in, out)
PRESETS = {  # kernel-relevant parts of the presets (docs/contract.md, "Presets")
    "A": dict(block=16, permute=True, row_rot="restore", block_out=16),
    "B": dict(block=64, permute=False, row_rot="0", block_out=64),
}
L2_FLUSH_BYTES = 160 * 2**20  # per-variant weight footprint that the rotation covers (H100 L2: 50 MB)


def capture(fn, n_copies: int, *, max_calls: int = 512):
    """A CUDA graph of `calls` invocations fn(i % n_copies) (after eager warm-up); returns (graph, calls)."""
    calls = int(min(max(n_copies, 8), max_calls))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(min(calls, 3)):
            fn(i % n_copies)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i % n_copies)
    return g, calls


def graph_time_us(fn, n_copies: int, *, reps: int = 15, warmup: int = 2, max_calls: int = 512) -> float:
    """Median µs of one `fn(i)` call, i cycling over n_copies, from CUDA-graph replays."""
    g, calls = capture(fn, n_copies, max_calls=max_calls)
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / calls)
    del g
    times.sort()
    return times[len(times) // 2]


def copies_for(bytes_per_copy: int) -> int:
    return max(1, math.ceil(L2_FLUSH_BYTES / max(bytes_per_copy, 1)))


def random_orthogonal_blocks(nb: int, b: int, device, gen=None) -> torch.Tensor:
    a = torch.randn(nb, b, b, device=device, dtype=torch.float64, generator=gen)
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]).to(torch.float32)


@dataclass
class SynthLayer:
    """A DuQuant layer built from a random weight with random orthogonal transforms (timing/checks)."""

    weight: torch.Tensor  # bf16 [N, K] original
    bias: torch.Tensor | None
    w4a8: W4A8Pack
    sim: SimPack


def synth_layer(
    k: int, n: int, preset: str = "A", *, device="cuda", bias: bool = True, gen=None, act_dtype=torch.bfloat16
) -> SynthLayer:
    p = PRESETS[preset]
    w = torch.randn(n, k, device=device, generator=gen) / math.sqrt(k)
    b = 0.1 * torch.randn(n, device=device, generator=gen) if bias else None
    perm = torch.randperm(k, device="cpu", generator=None).to(device) if p["permute"] else None
    r_in = random_orthogonal_blocks(k // p["block"], p["block"], device, gen)
    r_out = (
        random_orthogonal_blocks(n // p["block_out"], p["block_out"], device, gen)
        if p["row_rot"] != "0"
        else None
    )
    wt = w if perm is None else w[:, perm]
    wt = torch.einsum("onb,nbc->onc", wt.reshape(n, -1, p["block"]), r_in).reshape(n, k)
    if r_out is not None:
        wt = torch.einsum("nij,njk->nik", r_out, wt.reshape(-1, p["block_out"], k)).reshape(n, k)
    scales = (wt.abs().amax(1) / 7).clamp_min(1e-8)
    codes = torch.clamp(torch.round(wt / scales[:, None]), -8, 7).to(torch.int8)
    r_in_b = r_in.to(torch.bfloat16)
    pack = make_w4a8_pack(
        perm=perm,
        r_in=r_in_b,
        w_codes=codes,
        w_scales=scales,
        bias=b,
        r_out=r_out,
        row_rot=p["row_rot"],
        abits=8,
    )
    act_scale = torch.full((k,), 3.0 / 127, device=device) * (1 + torch.rand(k, device=device, generator=gen))
    sim = make_sim_pack(
        perm=perm,
        r_in=r_in_b,
        weight_q=codes.float() * scales[:, None],
        act_scale=act_scale,
        bias=b,
        r_out=r_out,
        row_rot=p["row_rot"],
        abits=8,
        dtype=act_dtype,
    )
    return SynthLayer(weight=w.to(act_dtype), bias=None if b is None else b.to(act_dtype), w4a8=pack, sim=sim)


# ---- expert-shaped stack (Gemma-300M action expert: width 1024, depth 18, MLP 4096, 8 q heads, 1 kv) ----

EXPERT_LINEARS = (
    ("q", 1024, 2048),
    ("k", 1024, 256),
    ("v", 1024, 256),
    ("o", 2048, 1024),
    ("gate", 1024, 4096),
    ("up", 1024, 4096),
    ("down", 4096, 1024),
)


EXPERT_MODES = {
    "bf16": "F.linear on the bf16 weights",
    "w4a8": "real W4A8, one layer at a time (pick_config)",
    "w4a8-grouped": "real W4A8, q/k/v and gate/up as W4A8Groups (one activation + one GEMM launch each)",
    "w4a8-grouped-geglu": "w4a8-grouped + gelu_tanh(gate) * up fused into the down projection's activation kernel",
    "w4a8-grouped-codes": "w4a8-grouped-geglu on small-M path C (two activation passes -> int8 codes, GEMM on codes)",
    "sim": "simulated path (static fake quant + cuBLAS)",
}


class ExpertStack:
    """18 Gemma layers (RMSNorm, GQA attention over the action tokens, gated GELU-tanh MLP); the linears run
    as one of EXPERT_MODES. Grouped modes apply up to SMALL_M tokens (the small-M kernels); more tokens run the
    members one by one."""

    def __init__(self, mode: str, preset: str = "A", depth: int = 18, device="cuda", seed: int = 0):
        from pytest_duquant.kernels import triton_kernels as tk
        from pytest_duquant.kernels.packs import make_w4a8_group

        if mode not in EXPERT_MODES:
            raise ValueError(f"ExpertStack: mode {mode!r} is not one of {sorted(EXPERT_MODES)}")
        self.tk = tk
        self.mode = mode
        self.grouped = mode.startswith("w4a8-grouped")
        self.geglu = mode in ("w4a8-grouped-geglu", "w4a8-grouped-codes")
        self.codes = mode == "w4a8-grouped-codes"
        self.depth = depth
        gen = torch.Generator(device=device).manual_seed(seed)
        self.layers = []
        for _ in range(depth):
            lay = {}
            for name, k, n in EXPERT_LINEARS:
                lay[name] = synth_layer(k, n, preset, device=device, bias=False, gen=gen)
                if mode == "bf16":
                    lay[name] = lay[name].weight
                elif mode.startswith("w4a8"):
                    lay[name] = lay[name].w4a8
                else:
                    lay[name] = lay[name].sim
            if self.grouped:  # members become views into the group's tensors (one copy of every weight)
                lay["qkv"] = make_w4a8_group([lay["q"], lay["k"], lay["v"]])
                lay["q"], lay["k"], lay["v"] = lay["qkv"].packs
                lay["gate_up"] = make_w4a8_group([lay["gate"], lay["up"]])
                lay["gate"], lay["up"] = lay["gate_up"].packs
            lay["ln1"] = torch.ones(1024, device=device, dtype=torch.bfloat16)
            lay["ln2"] = torch.ones(1024, device=device, dtype=torch.bfloat16)
            self.layers.append(lay)
        self.final_ln = torch.ones(1024, device=device, dtype=torch.bfloat16)

    def weight_bytes(self) -> int:
        """Bytes of every linear's stored form (a group's members are views: counted once, in the member)."""
        total = 0
        for lay in self.layers:
            for name, _, _ in EXPERT_LINEARS:
                t = lay[name]
                total += (
                    t.numel() * t.element_size()
                    if isinstance(t, torch.Tensor)
                    else t.nbytes()
                    if isinstance(t, W4A8Pack)
                    else t.weight.numel() * t.weight.element_size()
                )
        return total

    def _lin(self, w, x):
        if self.mode == "bf16":
            return F.linear(x, w)
        if self.mode.startswith("w4a8"):
            if self.codes and x.shape[0] <= SMALL_M:
                return self.tk.w4a8_linear(x, w, self._small(x, w))
            return self.tk.w4a8_linear(x, w)
        return self.tk.simulated_linear(x, w)

    def _small(self, x, target):
        return self.tk.small_config(x.shape[0], target.out_features, target.in_features, codes=self.codes)

    def _qkv(self, lay, h):
        if self.grouped and h.shape[0] <= SMALL_M:
            return lay["qkv"].split(self.tk.w4a8_small(h, lay["qkv"], self._small(h, lay["qkv"])))
        return tuple(self._lin(lay[n], h) for n in ("q", "k", "v"))

    def _mlp(self, lay, h):
        if self.grouped and h.shape[0] <= SMALL_M:
            gu = self.tk.w4a8_small(h, lay["gate_up"], self._small(h, lay["gate_up"]))
            if self.geglu:
                return self.tk.w4a8_small(gu, lay["down"], self._small(h, lay["down"]), geglu=True)
            g, u = lay["gate_up"].split(gu)
        else:
            g, u = self._lin(lay["gate"], h), self._lin(lay["up"], h)
        return self._lin(lay["down"], F.gelu(g, approximate="tanh") * u)

    @staticmethod
    def _rms(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w

    def velocity(self, x):  # x [T, 1024] bf16
        t = x.shape[0]
        for lay in self.layers:
            h = self._rms(x, lay["ln1"])
            q, k, v = self._qkv(lay, h)
            q = q.view(t, 8, 256).transpose(0, 1)
            k = k.view(t, 1, 256).transpose(0, 1).expand(8, t, 256)
            v = v.view(t, 1, 256).transpose(0, 1).expand(8, t, 256)
            a = F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))[0]
            x = x + self._lin(lay["o"], a.transpose(0, 1).reshape(t, 2048))
            h = self._rms(x, lay["ln2"])
            x = x + self._mlp(lay, h)
        return self._rms(x, self.final_ln)

    def denoise(self, x, steps: int = 10):
        dt = -1.0 / steps
        for _ in range(steps):
            x = x + dt * self.velocity(x)
        return x


def time_denoise(stack: ExpertStack, tokens: int, steps: int = 10, reps: int = 10) -> float:
    """Median µs of one whole denoising call (`steps` expert passes), captured in one CUDA graph."""
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    return graph_time_us(lambda i: stack.denoise(x, steps), 1, reps=reps, max_calls=1)
