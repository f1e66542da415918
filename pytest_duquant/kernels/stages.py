"""How one W4A8 linear runs on the GPU, in pure Python (no triton import): the kernel configuration for M
tokens (`pick_config`, `small_config`) and the two stages of a call (`linear_stages`): the activation side,
then the GEMM with its epilogue. `triton_kernels.w4a8_linear` runs `gemm(act(), pack)`; scripts/gpu_bench.py
times `act` and `gemm` apart with the same two functions, so the benchmark cannot call a kernel with operands
of another shape than the model path does (it did: for 64 < M <= 256 it passed the token-major GEMM the
activation kernel's [members, M, K] output unsliced, and crashed).
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_duquant.kernels.packing import PACK_GROUP
from pytest_duquant.kernels.packs import GROUP_TILE, SMALL_M


@dataclass(frozen=True)
class GemmConfig:
    # small M (swap=True: weights are the MMA's M side, bm tokens its N side; runs W4A8Groups too):
    #   "S": chunk kernel -> fp32 x_t + partial max, quantized in the GEMM's loop
    #   "C": two chunk passes -> int8 codes + scales, GEMM on the codes
    # token-major (swap=False):
    #   "S": fp32 x_t quantized in the GEMM's loop (64 < M <= 256)
    #   "Q": two chunk passes -> int8 codes, weight unpacked to int8 once, int8 x int8 GEMM (large M)
    #   "L": one two-pass kernel per row tile -> int8 codes (reference variant; slow: little parallelism)
    path: str = "L"
    bm: int = 64
    bn: int = 128
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    act_bm: int = 16
    act_warps: int = 4
    group_m: int = 8
    swap: bool = False

    def tag(self) -> str:
        if self.swap:
            return f"{'X' if self.path == 'S' else 'XC'}/bt{self.bm}/sk{self.split_k}/w{self.warps}/s{self.stages}"
        return (
            f"{self.path}/bm{self.bm}/bn{self.bn}/sk{self.split_k}/w{self.warps}"
            f"/s{self.stages}/abm{self.act_bm}" + (f"/aw{self.act_warps}" if self.act_warps != 4 else "")
        )


def _divisor_at_most(n: int, cap: int) -> int:
    for s in range(max(1, min(cap, n)), 0, -1):
        if n % s == 0:
            return s
    return 1


def small_config(
    m: int,
    n: int,
    k: int,
    *,
    bt: int | None = None,
    split: int | None = None,
    codes: bool = False,
    warps: int = 4,
    stages: int = 4,
) -> GemmConfig:
    """Small-M (swap-AB) config: bt tokens per tile (16 up to 16 tokens, else 32: the v4 sweep's best at 50),
    64 weight rows per tile, split-K so that row tiles x token tiles x split is about 256 programs
    (n = all members' outputs together for a W4A8Group)."""
    if bt is None:
        bt = 16 if m <= 16 else 32
    if split is None:
        tiles = -(-n // GROUP_TILE) * -(-m // bt)
        split = _divisor_at_most(k // PACK_GROUP, max(1, 256 // tiles))
    return GemmConfig(
        path="C" if codes else "S", bm=bt, bn=GROUP_TILE, split_k=split, warps=warps, stages=stages, swap=True
    )


def pick_config(m: int, n: int, k: int) -> GemmConfig:
    """Heuristic configuration (from the H100 sweeps of scripts/gpu_bench.py --sweep; docs/gpu-notes.md).

    M <= SMALL_M (64): the swap-AB small-M path (`small_config`). M <= 256: the token-major GEMM on fp32 x_t. Larger M:
    path "Q" (int8 codes, weight unpacked once per call)."""
    n_kt = k // PACK_GROUP
    if m <= SMALL_M:
        return small_config(m, n, k)
    if m <= 256:
        bm, bn = 64, 64
        tiles = -(-m // bm) * -(-n // bn)
        split = _divisor_at_most(n_kt, max(1, 132 // tiles))
        return GemmConfig(path="S", bm=bm, bn=bn, split_k=split, warps=4, stages=3, act_bm=32)
    return GemmConfig(path="Q", bm=128, bn=128, split_k=1, warps=8, stages=3, act_bm=64)


def linear_stages(x2, pack, cfg: GemmConfig, ops):
    """(act, gemm) of one W4A8 call on x2 [M, K] under `cfg`: act() -> the GEMM's operands; gemm(operands,
    pack) -> y [M, N] in x2's dtype (`pack` may be another copy of the same layer: the benchmark cycles
    weight copies). `ops`: the kernel module (pytest_duquant.kernels.triton_kernels)."""
    out_dtype = x2.dtype
    if cfg.swap:  # small M (swap-AB): every member's activation side, then one GEMM
        def act():
            return ops.act_small(x2, pack, cfg)

        def gemm(a, p):
            return ops.gemm_small(a[0], a[1], p, cfg, out_dtype=out_dtype)
    elif cfg.path == "L":
        def act():
            return ops.act_quant(x2, pack, bm=cfg.act_bm, warps=cfg.act_warps)

        def gemm(a, p):
            return ops.w4a8_gemm(a[0], a[1], p, cfg, a_float=False, out_dtype=out_dtype)
    elif cfg.path == "Q":
        def act():
            return ops.act_quant_large(x2, pack, cfg)

        def gemm(a, p):
            return ops.w4a8_gemm(a[0], a[1], p, cfg, a_float=False, out_dtype=out_dtype,
                                 w_int8=ops.unpack_weight_int8(p))
    elif cfg.path == "S":  # token-major on fp32 x_t: the chunk kernel returns [members=1, M, K]; one member
        def act():
            return ops.act_chunks(x2, pack.perm, pack.r_in, pack.block, mode=0, bm=cfg.act_bm, warps=cfg.act_warps)

        def gemm(a, p):
            return ops.w4a8_gemm(a[0][0], a[1][0], p, cfg, a_float=True, out_dtype=out_dtype)
    else:
        raise ValueError(f"linear_stages: unknown path {cfg.path!r} (swap=False)")
    return act, gemm
