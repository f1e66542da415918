"""Triton kernels for DuQuant W4A8 (imported lazily: only on a CUDA machine with triton).

Kernels (each has a twin in `reference.py`):
  _act_chunk_kernel   one (row tile, 64-column chunk, group member) per program; MODE 0 stores x_t (fp32) and
                      per-row partial max|x_t| (small M: the GEMM quantizes in its loop); MODE 1 static
                      per-channel fake quant (simulated path); MODE 2 transform only; MODE 3/4 the two passes of
                      per-token int8 codes. Optional GeGLU prologue (input gelu_tanh(gate) * up).
  _act_quant_kernel   x -> gather(perm) -> block rotation -> per-token int8 codes + scales, one row tile per
                      program, two passes over K (reference variant "L").
  _w4a8_gemm_small_kernel  few tokens ("swap AB": unpacked int4 weights are the MMA's M side, tokens its N
                      side) on fp32 x_t (quantized in the loop) or int8 codes; every member of a W4A8Group in
                      one launch; split-K with an in-kernel fix-up; epilogue * s_a * s_w, restore, bias.
  _w4a8_gemm_kernel   token-major tiles: int8 codes (or fp32 x_t quantized in the K loop) x packed int4 (or
                      int8-unpacked) weights, int32 tensor-core accumulation, the same epilogue.

Rotation chunks: a 64-wide output chunk c of x_t is x[:, cols] @ Rc, where for block b <= 64 cols are the
64 channels of the chunk and Rc the 64x64 block-diagonal made of 64/b blocks (built by a masked load from
the compact [nb, b, b] tensor), and for b > 64 cols are the b channels of the block and Rc its 64 columns.
Kernels measured and removed (docs/gpu-notes.md): a one-launch small-M kernel with a grid barrier (v4) and an
activation kernel with a launch barrier writing int8 codes (v5): each barrier cost 3-5 µs, more than a launch.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pytest_duquant.kernels.packing import PACK_GROUP
from pytest_duquant.kernels.packs import CHUNK, GROUP_TILE, SimPack, W4A8Group, W4A8Pack
from pytest_duquant.kernels.stages import (  # noqa: F401 - GemmConfig and the pickers are used as tk.*
    GemmConfig,
    _divisor_at_most,
    linear_stages,
    pick_config,
    small_config,
)


@triton.jit
def _rne(v):
    """Round half to even (torch.round) in float32."""
    f = tl.floor(v)
    d = v - f
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + odd))


@triton.jit
def _rot_chunk(
    x_ptr,
    stride_xm,
    perm_ptr,
    r_ptr,
    rows,
    row_mask,
    c,
    B: tl.constexpr,
    W: tl.constexpr,
    HAS_PERM: tl.constexpr,
    GEGLU: tl.constexpr = False,
    UP_OFF=0,
):
    i = tl.arange(0, W)
    j = tl.arange(0, 64)
    if B <= 64:
        start = c * 64
        ridx = (start + i)[:, None] * B + (j % B)[None, :]
        rmask = (i // B)[:, None] == (j // B)[None, :]
    else:
        blk = (c * 64) // B
        start = blk * B
        ridx = blk * B * B + i[:, None] * B + ((c * 64 - start) + j)[None, :]
        rmask = (i[:, None] < W) & (j[None, :] < 64)
    cols = start + i
    if HAS_PERM:
        src = tl.load(perm_ptr + cols)
    else:
        src = cols
    x = tl.load(x_ptr + rows[:, None] * stride_xm + src[None, :], mask=row_mask[:, None], other=0.0)
    if GEGLU:  # x holds [gate | up]: the down projection's input gelu_tanh(gate) * up, rounded like eager bf16
        u = tl.load(x_ptr + rows[:, None] * stride_xm + UP_OFF + src[None, :], mask=row_mask[:, None], other=0.0)
        g = x.to(tl.float32)
        gl = 0.5 * g * (1.0 + libdevice.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
        x = (gl.to(x.dtype).to(tl.float32) * u.to(tl.float32)).to(x.dtype)
    r = tl.load(r_ptr + ridx, mask=rmask, other=0.0)
    return tl.dot(x.to(r.dtype), r)


@triton.jit
def _scale_from_partials(pm_ptr, rows, rmask, NPM, NPM_P2: tl.constexpr, QMAX: tl.constexpr):
    """Per-token scale max(max_c pm[row, c] / qmax, 1e-8) from the per-chunk partial maxima pm [rows, NPM]."""
    pc = tl.arange(0, NPM_P2)
    pm = tl.load(
        pm_ptr + rows[:, None] * NPM + pc[None, :], mask=rmask[:, None] & (pc < NPM)[None, :], other=0.0
    )
    return tl.maximum(tl.max(pm, axis=1) / QMAX, 1e-8)


@triton.jit
def _quant_codes(x, inv, QMAX: tl.constexpr):
    """int8 codes of a [rows, cols] fp32 tile with per-row reciprocal scales inv (rint = round half to even)."""
    return tl.minimum(tl.maximum(libdevice.rint(x * inv[:, None]), -QMAX - 1.0), QMAX * 1.0).to(tl.int8)


@triton.jit
def _unpack_int4(wp):
    """Packed bytes [rows, 64] -> (low nibbles, high nibbles) as signed int8 (channels i and i + 64)."""
    w32 = wp.to(tl.int32)
    return ((w32 << 28) >> 28).to(tl.int8), ((w32 << 24) >> 28).to(tl.int8)


@triton.jit
def _k_slice(K, SPLIT_K: tl.constexpr, pid_k):
    """[kt0, kt1): the 128-wide K steps of split-K slice pid_k."""
    n_kt = K // 128
    per = tl.cdiv(n_kt, SPLIT_K)
    kt0 = pid_k * per
    return kt0, tl.minimum(kt0 + per, n_kt)


@triton.jit
def _act_quant_kernel(
    x_ptr,
    perm_ptr,
    r_ptr,
    q_ptr,
    s_ptr,
    M,
    nch,
    stride_xm,
    stride_qm,
    QMAX: tl.constexpr,
    B: tl.constexpr,
    W: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < M
    amax = tl.zeros((BM,), dtype=tl.float32)
    for c in range(0, nch):
        v = _rot_chunk(x_ptr, stride_xm, perm_ptr, r_ptr, rows, rmask, c, B, W, HAS_PERM)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))
    scale = tl.maximum(amax / QMAX, 1e-8)
    j = tl.arange(0, 64)
    for c in range(0, nch):
        v = _rot_chunk(x_ptr, stride_xm, perm_ptr, r_ptr, rows, rmask, c, B, W, HAS_PERM)
        q = _rne(v / scale[:, None])
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
        tl.store(
            q_ptr + rows[:, None] * stride_qm + (c * 64 + j)[None, :], q.to(tl.int8), mask=rmask[:, None]
        )
    tl.store(s_ptr + rows, scale, mask=rmask)


@triton.jit
def _act_chunk_kernel(
    x_ptr,
    perm_ptr,
    r_ptr,
    out_ptr,
    aux_ptr,
    M,
    K,
    stride_xm,
    stride_om,
    MODE: tl.constexpr,
    QMAX: tl.constexpr,
    B: tl.constexpr,
    W: tl.constexpr,
    HAS_PERM: tl.constexpr,
    BM: tl.constexpr,
    scale_ptr=None,
    NPM_P2: tl.constexpr = 1,
    GEGLU: tl.constexpr = False,
):
    """Program (row tile, 64-column chunk c, group member s). Member s reads perm[s], r_in[s] and writes
    out[s] ([S, M, K]), aux[s] ([S, M, K/64] partial maxima) and scale[s]."""
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.program_id(2)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    v = _rot_chunk(
        x_ptr, stride_xm, perm_ptr + s * K, r_ptr + s * K * B, rows, rmask, c, B, W, HAS_PERM, GEGLU, K
    )
    out_ptr += s * M * stride_om
    if MODE != 1:
        aux_ptr += s * M * (K // 64)
    if MODE == 4:
        scale_ptr += s * M
    cols = c * 64 + tl.arange(0, 64)
    optr = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if MODE == 0:
        tl.store(optr, v.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        tl.store(aux_ptr + rows * (K // 64) + c, tl.max(tl.abs(v), axis=1), mask=rmask)
    elif MODE == 1:
        s = tl.load(aux_ptr + cols)
        q = _rne(v / s[None, :])
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
        tl.store(optr, (q * s[None, :]).to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    elif MODE == 2:
        tl.store(optr, v.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    elif MODE == 3:  # partial max only (first pass of the large-M path)
        tl.store(aux_ptr + rows * (K // 64) + c, tl.max(tl.abs(v), axis=1), mask=rmask)
    else:  # MODE 4: int8 codes with the full per-token scale from the partial maxima in aux [M, K/64]
        sa = _scale_from_partials(aux_ptr, rows, rmask, K // 64, NPM_P2, QMAX)
        q = tl.minimum(tl.maximum(_rne(v / sa[:, None]), -QMAX - 1.0), QMAX * 1.0)
        tl.store(optr, q.to(tl.int8), mask=rmask[:, None])
        if c == 0:
            tl.store(scale_ptr + rows, sa, mask=rmask)


@triton.jit
def _unpack_int4_kernel(p_ptr, w_ptr, N, K, BN: tl.constexpr):
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    kk = tl.arange(0, 64)
    m = (rn < N)[:, None]
    lo, hi = _unpack_int4(tl.load(p_ptr + rn[:, None] * (K // 2) + g * 64 + kk[None, :], mask=m, other=0))
    base = w_ptr + rn[:, None] * K + g * 128 + kk[None, :]
    tl.store(base, lo, mask=m)
    tl.store(base + 64, hi, mask=m)


@triton.jit
def _gemm_finish(
    y,
    rm,
    rn,
    pid_n,
    N,
    mmask,
    nmask,
    bias_ptr,
    ro_ptr,
    out_ptr,
    stride_om,
    HAS_BIAS: tl.constexpr,
    RESTORE: tl.constexpr,
    BO: tl.constexpr,
    BN: tl.constexpr,
):
    if RESTORE:
        ii = tl.arange(0, BN)
        g = pid_n * BN + ii
        ridx = g[:, None] * BO + (ii % BO)[None, :]
        rmsk = ((ii // BO)[:, None] == (ii // BO)[None, :]) & (g < N)[:, None]
        rr = tl.load(ro_ptr + ridx, mask=rmsk, other=0.0).to(tl.bfloat16)
        y = tl.dot(y.to(tl.bfloat16), rr)  # bf16 operands, fp32 accumulate (2x tf32 rate, half the smem)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn, mask=nmask, other=0.0)
        y = y + b[None, :]
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=mmask[:, None] & nmask[None, :],
    )


@triton.jit
def _w4a8_gemm_kernel(
    a_ptr,
    sa_ptr,
    pm_ptr,
    w_ptr,
    sw_ptr,
    bias_ptr,
    ro_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_am,
    stride_om,
    NPM,
    A_FLOAT: tl.constexpr,
    NPM_P2: tl.constexpr,
    QMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESTORE: tl.constexpr,
    BO: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GROUP_M: tl.constexpr,
    W_INT8: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % width) % gsz)
    pid_n = (pid % width) // gsz
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    kk = tl.arange(0, 64)
    kt0, kt1 = _k_slice(K, SPLIT_K, pid_k)
    if A_FLOAT:
        sa = _scale_from_partials(pm_ptr, rm, mmask, NPM, NPM_P2, QMAX)
        inv = 1.0 / sa
    else:
        sa = tl.load(sa_ptr + rm, mask=mmask, other=1.0)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    a_base = a_ptr + rm[:, None] * stride_am + kk[None, :]
    w_base = w_ptr + rn[:, None] * (K // 2) + kk[None, :]
    if W_INT8:  # one K=128 dot per step on int8 codes in natural order (A must be int8 codes)
        kf = tl.arange(0, 128)
        a_full = a_ptr + rm[:, None] * stride_am + kf[None, :]
        w_full = w_ptr + rn[:, None] * K + kf[None, :]
        for kt in range(kt0, kt1):
            a_t = tl.load(a_full + kt * 128, mask=mmask[:, None], other=0)
            w_t = tl.load(w_full + kt * 128, mask=nmask[:, None], other=0)
            acc = tl.dot(a_t, tl.trans(w_t), acc, out_dtype=tl.int32)
        kt1 = kt0  # the packed loop below does nothing
    for kt in range(kt0, kt1):
        w_lo, w_hi = _unpack_int4(tl.load(w_base + kt * 64, mask=nmask[:, None], other=0))
        if A_FLOAT:
            al = _quant_codes(tl.load(a_base + kt * 128, mask=mmask[:, None], other=0.0), inv, QMAX)
            ah = _quant_codes(tl.load(a_base + kt * 128 + 64, mask=mmask[:, None], other=0.0), inv, QMAX)
        else:
            al = tl.load(a_base + kt * 128, mask=mmask[:, None], other=0)
            ah = tl.load(a_base + kt * 128 + 64, mask=mmask[:, None], other=0)
        acc = tl.dot(al, tl.trans(w_lo), acc, out_dtype=tl.int32)
        acc = tl.dot(ah, tl.trans(w_hi), acc, out_dtype=tl.int32)
    sw = tl.load(sw_ptr + rn, mask=nmask, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    if SPLIT_K == 1:
        _gemm_finish(
            y, rm, rn, pid_n, N, mmask, nmask, bias_ptr, ro_ptr, out_ptr, stride_om, HAS_BIAS, RESTORE, BO, BN
        )
    else:
        omask = mmask[:, None] & nmask[None, :]
        tile = rm[:, None] * N + rn[None, :]
        tl.store(ws_ptr + pid_k * M * N + tile, y, mask=omask)
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            tot = tl.zeros((BM, BN), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                tot += tl.load(ws_ptr + s * M * N + tile, mask=omask, other=0.0, cache_modifier=".cg")
            _gemm_finish(
                tot,
                rm,
                rn,
                pid_n,
                N,
                mmask,
                nmask,
                bias_ptr,
                ro_ptr,
                out_ptr,
                stride_om,
                HAS_BIAS,
                RESTORE,
                BO,
                BN,
            )
            tl.atomic_xchg(cnt_ptr + pid, 0)


@triton.jit
def _swap_epilogue(
    acc,
    sa,
    rt,
    rw,
    tmask,
    wmask,
    pid_n,
    pid_k,
    cnt_idx,
    sw_ptr,
    bias_ptr,
    ro_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    stride_om,
    HAS_BIAS: tl.constexpr,
    RESTORE: tl.constexpr,
    BO: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BT: tl.constexpr,
    BW: tl.constexpr,
):
    """Swap-AB epilogue: y_tᵀ tile = acc * s_w * s_a; split-K partials go to the workspace and the last
    K-slice of the tile (counter cnt_idx, reset by it) sums them; then restore rotation, bias, store."""
    sw = tl.load(sw_ptr + rw, mask=wmask, other=0.0)
    y = acc.to(tl.float32) * sw[:, None] * sa[None, :]  # [BW, BT] = y_tᵀ tile
    omask = wmask[:, None] & tmask[None, :]
    tile = rt[None, :] * N + rw[:, None]
    if SPLIT_K > 1:
        tl.store(ws_ptr + pid_k * M * N + tile, y, mask=omask)
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + cnt_idx, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            y = tl.zeros((BW, BT), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                y += tl.load(ws_ptr + s * M * N + tile, mask=omask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + cnt_idx, 0)
            _swap_finish(
                y, rt, rw, pid_n, N, omask, wmask, bias_ptr, ro_ptr, out_ptr, stride_om, HAS_BIAS, RESTORE, BO, BW
            )
    else:
        _swap_finish(
            y, rt, rw, pid_n, N, omask, wmask, bias_ptr, ro_ptr, out_ptr, stride_om, HAS_BIAS, RESTORE, BO, BW
        )


@triton.jit
def _w4a8_gemm_small_kernel(
    a_ptr,
    sa_ptr,
    member_ptr,
    w_ptr,
    sw_ptr,
    bias_ptr,
    ro_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_om,
    A_FLOAT: tl.constexpr,
    NPM_P2: tl.constexpr,
    QMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESTORE: tl.constexpr,
    BO: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BT: tl.constexpr,
    BW: tl.constexpr,
    GROUPED: tl.constexpr,
):
    """Small-M GEMM ("swap AB"): acc[BW weights, BT tokens] = W_tile @ A_tileᵀ, so the unpacked int4 weight is
    the MMA's M side and tokens its N side. A is fp32 x_t [S, M, K] quantized in the loop with the per-token
    scale from the partial maxima sa_ptr [S, M, K/64] (A_FLOAT), or int8 codes [S, M, K] with scales [S, M].
    Grid (row tiles, split-K, token tiles). Grouped: row tile pid_n belongs to member member_ptr[pid_n]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rt = pid_m * BT + tl.arange(0, BT)
    rw = pid_n * BW + tl.arange(0, BW)
    tmask = rt < M
    wmask = rw < N
    if GROUPED:
        mem = tl.load(member_ptr + pid_n)
    else:
        mem = 0
    row = mem * M + rt
    kk = tl.arange(0, 64)
    kt0, kt1 = _k_slice(K, SPLIT_K, pid_k)
    if A_FLOAT:
        sa = _scale_from_partials(sa_ptr, row, tmask, K // 64, NPM_P2, QMAX)
        inv = 1.0 / sa
    else:
        sa = tl.load(sa_ptr + row, mask=tmask, other=1.0)
    acc = tl.zeros((BW, BT), dtype=tl.int32)
    a_base = a_ptr + row[:, None] * K + kk[None, :]
    w_base = w_ptr + rw[:, None] * (K // 2) + kk[None, :]
    # software pipelining by hand: the loads of step kt+1 are issued before step kt's unpack/quantize/MMA
    # (the compiler's pipeliner does not overlap loads whose values pass through registers before the dot;
    # v5 measured ~1.1-2.3 µs per unpipelined 128-wide step)
    live = kt0 < kt1
    wp = tl.load(w_base + kt0 * 64, mask=wmask[:, None] & live, other=0)
    xl = tl.load(a_base + kt0 * 128, mask=tmask[:, None] & live, other=0)
    xh = tl.load(a_base + kt0 * 128 + 64, mask=tmask[:, None] & live, other=0)
    for kt in range(kt0, kt1):
        nxt = (kt + 1) < kt1
        wp_n = tl.load(w_base + (kt + 1) * 64, mask=wmask[:, None] & nxt, other=0)
        xl_n = tl.load(a_base + (kt + 1) * 128, mask=tmask[:, None] & nxt, other=0)
        xh_n = tl.load(a_base + (kt + 1) * 128 + 64, mask=tmask[:, None] & nxt, other=0)
        w_lo, w_hi = _unpack_int4(wp)
        if A_FLOAT:
            al = _quant_codes(xl, inv, QMAX)
            ah = _quant_codes(xh, inv, QMAX)
        else:
            al = xl
            ah = xh
        acc = tl.dot(w_lo, tl.trans(al), acc, out_dtype=tl.int32)
        acc = tl.dot(w_hi, tl.trans(ah), acc, out_dtype=tl.int32)
        wp, xl, xh = wp_n, xl_n, xh_n
    _swap_epilogue(
        acc,
        sa,
        rt,
        rw,
        tmask,
        wmask,
        pid_n,
        pid_k,
        pid_m * tl.num_programs(0) + pid_n,
        sw_ptr,
        bias_ptr,
        ro_ptr,
        out_ptr,
        ws_ptr,
        cnt_ptr,
        M,
        N,
        stride_om,
        HAS_BIAS,
        RESTORE,
        BO,
        SPLIT_K,
        BT,
        BW,
    )


@triton.jit
def _swap_finish(
    y,
    rt,
    rw,
    pid_n,
    N,
    omask,
    wmask,
    bias_ptr,
    ro_ptr,
    out_ptr,
    stride_om,
    HAS_BIAS: tl.constexpr,
    RESTORE: tl.constexpr,
    BO: tl.constexpr,
    BW: tl.constexpr,
):
    if RESTORE:  # yᵀ <- R_tileᵀ yᵀ, R_tileᵀ[i, j] = R_tile[j, i]
        ii = tl.arange(0, BW)
        g = pid_n * BW + ii
        ridx = g[None, :] * BO + (ii % BO)[:, None]
        rmsk = ((ii // BO)[:, None] == (ii // BO)[None, :]) & (g < N)[None, :]
        rt_t = tl.load(ro_ptr + ridx, mask=rmsk, other=0.0).to(tl.float32)
        y = tl.dot(rt_t, y)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rw, mask=wmask, other=0.0)
        y = y + b[:, None]
    tl.store(out_ptr + rt[None, :] * stride_om + rw[:, None], y.to(out_ptr.dtype.element_ty), mask=omask)


# ---- launchers -------------------------------------------------------------------------------------


_THIS = sys.modules[__name__]  # the kernel module `stages.linear_stages` calls into
_COUNTERS: dict = {}
POISON = False  # tests set this: every buffer a launcher allocates starts as NaN (floats) / 99 (ints)


def _empty(shape, dtype, device):
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else 99
    return torch.full(shape, fill, dtype=dtype, device=device)


def _counters(device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _rot_params(block: int) -> tuple[int, int]:
    return block, max(block, CHUNK)


def _members(target) -> int:
    return target.size if isinstance(target, W4A8Group) else 1


def act_quant(x2d: torch.Tensor, pack: W4A8Pack, *, bm: int = 16, warps: int = 4):
    """Fused gather + rotation + per-token quantization: (codes int8 [M, K], scales float32 [M])."""
    m, k = x2d.shape
    q = _empty((m, k), torch.int8, x2d.device)
    s = _empty((m,), torch.float32, x2d.device)
    b, w = _rot_params(pack.block)
    perm = pack.perm if pack.perm is not None else pack.w_scales
    _act_quant_kernel[(triton.cdiv(m, bm),)](
        x2d,
        perm,
        pack.r_in,
        q,
        s,
        m,
        k // CHUNK,
        x2d.stride(0),
        q.stride(0),
        QMAX=pack.qmax_a,
        B=b,
        W=w,
        HAS_PERM=pack.perm is not None,
        BM=bm,
        num_warps=warps,
    )
    return q, s


def _check_input(x2d: torch.Tensor, k: int, geglu: bool) -> None:
    if x2d.shape[1] < (2 * k if geglu else k) or x2d.stride(1) != 1:
        raise ValueError(
            f"activation kernel: input {tuple(x2d.shape)} does not fit in_features={k} (geglu={geglu}; "
            "a GeGLU input holds [gate | up], 2 * in_features wide, rows contiguous)"
        )


def act_chunks(
    x2d: torch.Tensor,
    perm,
    r_in,
    block: int,
    *,
    mode: int,
    aux=None,
    out_dtype=torch.float32,
    qmax: int = 127,
    bm: int = 16,
    warps: int = 4,
    members: int = 1,
    geglu: bool = False,
):
    """Chunk-parallel activation transform. mode 0: (x_t [S, M, K] fp32, partial max [S, M, K/64]) for the
    S = `members` transforms stacked in perm / r_in; 1: static fake quant (one member); 2: x_t.
    `geglu`: x2d holds [gate | up] and the input is gelu_tanh(gate) * up."""
    m = x2d.shape[0]
    k = r_in.shape[0] * r_in.shape[1] // members
    _check_input(x2d, k, geglu)
    out = _empty((members, m, k) if members > 1 or mode == 0 else (m, k), out_dtype, x2d.device)
    if mode == 0:
        aux = _empty((members, m, k // CHUNK), torch.float32, x2d.device)
    b, w = _rot_params(block)
    _act_chunk_kernel[(triton.cdiv(m, bm), k // CHUNK, members)](
        x2d,
        perm if perm is not None else r_in,
        r_in,
        out,
        aux if aux is not None else out,
        m,
        k,
        x2d.stride(0),
        k,
        MODE=mode,
        QMAX=qmax,
        B=b,
        W=w,
        HAS_PERM=perm is not None,
        BM=bm,
        GEGLU=geglu,
        num_warps=warps,
    )
    return (out, aux) if mode == 0 else out


def act_quant_chunked(
    x2d: torch.Tensor, target: W4A8Pack | W4A8Group, *, bm: int = 64, warps: int = 4, geglu: bool = False
):
    """Chunk-parallel per-token int8 codes: pass 1 partial max|x_t|, pass 2 recompute + codes.
    Returns (codes int8 [S, M, K], scales float32 [S, M]) for the S members of a group (S = 1 for a layer)."""
    m = x2d.shape[0]
    k = target.in_features
    _check_input(x2d, k, geglu)
    size = _members(target)
    pm = _empty((size, m, k // CHUNK), torch.float32, x2d.device)
    q = _empty((size, m, k), torch.int8, x2d.device)
    s = _empty((size, m), torch.float32, x2d.device)
    b, w = _rot_params(target.block)
    perm = target.perm if target.perm is not None else target.r_in
    for mode in (3, 4):
        _act_chunk_kernel[(triton.cdiv(m, bm), k // CHUNK, size)](
            x2d,
            perm,
            target.r_in,
            q,
            pm,
            m,
            k,
            x2d.stride(0),
            k,
            MODE=mode,
            QMAX=target.qmax_a,
            B=b,
            W=w,
            HAS_PERM=target.perm is not None,
            BM=bm,
            scale_ptr=s,
            NPM_P2=triton.next_power_of_2(k // CHUNK),
            GEGLU=geglu,
            num_warps=warps,
        )
    return q, s


def act_quant_large(x2d: torch.Tensor, pack: W4A8Pack, cfg: GemmConfig):
    """Large-M activation side (path "Q"). With a permutation, x is first gathered once by `index_select`
    (consecutive threads read one row: the row's sectors are reused in L1) so the two chunk passes read
    contiguous 128-byte rows instead of a scattered 2-byte gather per element per pass (v4: 70 -> ~29 µs at
    M=4096, K=1024). Returns (codes [M, K], scales [M])."""
    if pack.perm is not None:
        x2d = x2d.index_select(1, pack.perm)
        pack = dataclasses.replace(pack, perm=None)
    q, s = act_quant_chunked(x2d, pack, bm=cfg.act_bm, warps=cfg.act_warps)
    return q[0], s[0]


def unpack_weight_int8(pack: W4A8Pack) -> torch.Tensor:
    """int8 codes [N, K] (natural order) from the packed weight: a per-call temporary for the large-M GEMM."""
    n, k = pack.out_features, pack.in_features
    w = _empty((n, k), torch.int8, pack.w_packed.device)
    _unpack_int4_kernel[(triton.cdiv(n, 64), k // PACK_GROUP)](pack.w_packed, w, n, k, BN=64, num_warps=4)
    return w


def _epilogue_plan(target, bn: int, epilogue: bool):
    """(restore, fuse_restore, has_bias): the restore rotation is fused when block_out tiles the N tile."""
    restore = epilogue and target.r_out is not None
    fuse_restore = restore and bn % target.block_out == 0 and target.block_out >= 16
    has_bias = epilogue and target.bias is not None and (fuse_restore or not restore)
    return restore, fuse_restore, has_bias


def gemm_small(
    a: torch.Tensor,
    a_scale_or_pmax: torch.Tensor,
    target: W4A8Pack | W4A8Group,
    cfg: GemmConfig,
    *,
    out_dtype=torch.bfloat16,
    epilogue: bool = True,
) -> torch.Tensor:
    """Small-M swap-AB GEMM of every member: a = fp32 x_t [S, M, K] with partial maxima [S, M, K/64], or int8
    codes [S, M, K] with scales [S, M]. Returns [M, N_total] (+ scales, restore rotation, bias)."""
    if a.dim() == 2:
        a, a_scale_or_pmax = a[None], a_scale_or_pmax[None]
    _, m, k = a.shape
    n = target.out_features
    grouped = isinstance(target, W4A8Group)
    if cfg.bn != GROUP_TILE:
        raise ValueError(f"gemm_small: weight tiles must be {GROUP_TILE} rows (got bn={cfg.bn})")
    out = _empty((m, n), out_dtype, a.device)
    restore, fuse_restore, has_bias = _epilogue_plan(target, GROUP_TILE, epilogue)
    out_k = out if not (restore and not fuse_restore) else _empty((m, n), torch.float32, a.device)
    split = cfg.split_k
    n_t, t_t = triton.cdiv(n, GROUP_TILE), triton.cdiv(m, cfg.bm)
    _w4a8_gemm_small_kernel[(n_t, split, t_t)](
        a,
        a_scale_or_pmax,
        target.tile_member if grouped else target.w_scales,
        target.w_packed,
        target.w_scales,
        target.bias if has_bias else target.w_scales,
        target.r_out if fuse_restore else target.w_scales,
        out_k,
        _empty((split, m, n), torch.float32, a.device) if split > 1 else out_k,
        _counters(a.device, n_t * t_t) if split > 1 else target.w_scales,
        m,
        n,
        k,
        out_k.stride(0),
        A_FLOAT=a.dtype == torch.float32,
        NPM_P2=triton.next_power_of_2(k // CHUNK),
        QMAX=target.qmax_a,
        HAS_BIAS=has_bias,
        RESTORE=fuse_restore,
        BO=max(target.block_out, 1),
        SPLIT_K=split,
        BT=cfg.bm,
        BW=GROUP_TILE,
        GROUPED=grouped,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    if restore and not fuse_restore:
        _restore_unfused(out_k, target, out)
    return out


def act_small(x2d: torch.Tensor, target: W4A8Pack | W4A8Group, cfg: GemmConfig, *, geglu: bool = False):
    """Activation side of the small-M path: path "S" (fp32 x_t, partial maxima) or "C" (codes, scales)."""
    if cfg.path == "C":
        return act_quant_chunked(x2d, target, bm=cfg.act_bm, warps=cfg.act_warps, geglu=geglu)
    return act_chunks(
        x2d,
        target.perm,
        target.r_in,
        target.block,
        mode=0,
        bm=cfg.act_bm,
        warps=cfg.act_warps,
        members=_members(target),
        geglu=geglu,
    )


def w4a8_small(
    x2d: torch.Tensor,
    target: W4A8Pack | W4A8Group,
    cfg: GemmConfig | None = None,
    *,
    out_dtype=None,
    epilogue: bool = True,
    geglu: bool = False,
) -> torch.Tensor:
    """Real W4A8 forward for few tokens, of a layer or a whole W4A8Group, in two launches (three for path
    "C"): the activation side of every member (`act_small`) then one GEMM over every member's rows
    (`gemm_small`). Returns [M, N_total] (a group's members side by side: `group.split(y)`). `geglu`: x2d holds
    [gate | up] (the input is gelu_tanh(gate) * up). `epilogue=False` leaves out bias and restore."""
    cfg = cfg or small_config(x2d.shape[0], target.out_features, target.in_features)
    a, sa = act_small(x2d, target, cfg, geglu=geglu)
    return gemm_small(a, sa, target, cfg, out_dtype=out_dtype or x2d.dtype, epilogue=epilogue)


def w4a8_gemm(
    a: torch.Tensor,
    a_scale_or_pmax: torch.Tensor,
    pack: W4A8Pack,
    cfg: GemmConfig,
    *,
    a_float: bool,
    out_dtype=torch.bfloat16,
    epilogue: bool = True,
    w_int8=None,
) -> torch.Tensor:
    """GEMM + epilogue. `epilogue=False` leaves out bias and restore (integer tests). `w_int8`: the weight
    already unpacked to int8 [N, K] (large-M path); otherwise the packed int4 weight is unpacked in
    registers. Small-M (swap) configs go to `gemm_small`."""
    if cfg.swap:
        return gemm_small(a, a_scale_or_pmax, pack, cfg, out_dtype=out_dtype, epilogue=epilogue)
    m, k = a.shape
    n = pack.out_features
    out = _empty((m, n), out_dtype, a.device)
    restore, fuse_restore, has_bias = _epilogue_plan(pack, cfg.bn, epilogue)
    bm, bn, split = cfg.bm, cfg.bn, cfg.split_k
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    npm = k // CHUNK
    out_k = out if not (restore and not fuse_restore) else _empty((m, n), torch.float32, a.device)
    _w4a8_gemm_kernel[(tiles, split)](
        a,
        a_scale_or_pmax,
        a_scale_or_pmax,
        pack.w_packed if w_int8 is None else w_int8,
        pack.w_scales,
        pack.bias if has_bias else pack.w_scales,
        pack.r_out if fuse_restore else pack.w_scales,
        out_k,
        _empty((split, m, n), torch.float32, a.device) if split > 1 else out,
        _counters(a.device, tiles) if split > 1 else pack.w_scales,
        m,
        n,
        k,
        a.stride(0),
        out_k.stride(0),
        npm,
        A_FLOAT=a_float,
        NPM_P2=triton.next_power_of_2(npm),
        QMAX=pack.qmax_a,
        HAS_BIAS=has_bias,
        RESTORE=fuse_restore,
        BO=max(pack.block_out, 1),
        SPLIT_K=split,
        BM=bm,
        BN=bn,
        GROUP_M=cfg.group_m,
        W_INT8=w_int8 is not None,
        num_warps=cfg.warps,
        num_stages=cfg.stages,
    )
    if restore and not fuse_restore:
        _restore_unfused(out_k, pack, out)
    return out


def _restore_unfused(y_t: torch.Tensor, pack, out: torch.Tensor) -> None:
    """block_out does not tile the GEMM's N tile: the restore rotation (+ bias) as a separate small step."""
    m, n = y_t.shape
    nbo, bo, _ = pack.r_out.shape
    y = torch.einsum("mnb,nbc->mnc", y_t.view(m, nbo, bo), pack.r_out.float()).reshape(m, n)
    if pack.bias is not None:
        y = y + pack.bias
    out.copy_(y)


def w4a8_linear(x: torch.Tensor, pack: W4A8Pack, cfg: GemmConfig | None = None) -> torch.Tensor:
    """Real W4A8 forward: activation kernel + int8 x int4 GEMM; returns x.dtype [..., N]. The two stages come
    from `stages.linear_stages` (the benchmark times them apart with the same code)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pack.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if cfg is None:
        cfg = pick_config(m, pack.out_features, pack.in_features)
    act, gemm = linear_stages(x2, pack, cfg, _THIS)
    y = gemm(act(), pack)
    return y.reshape(*lead, pack.out_features)


def sim_act(x2d: torch.Tensor, pack: SimPack, *, bm: int = 32, warps: int = 4) -> torch.Tensor:
    mode = 1 if pack.act_scale is not None else 2
    return act_chunks(
        x2d,
        pack.perm,
        pack.r_in,
        pack.block,
        mode=mode,
        aux=pack.act_scale,
        out_dtype=pack.weight.dtype,
        qmax=max(pack.qmax_a, 1),
        bm=bm,
        warps=warps,
    )


def simulated_linear(x: torch.Tensor, pack: SimPack, *, bm: int | None = None) -> torch.Tensor:
    """Fast simulated forward: one fused transform + fake-quant kernel, then one cuBLAS GEMM (+ bias)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pack.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bm is None:
        bm = 16 if x2.shape[0] <= 64 else 64
    xq = sim_act(x2.to(pack.weight.dtype) if x2.dtype != pack.weight.dtype else x2, pack, bm=bm)
    y = torch.nn.functional.linear(xq, pack.weight, pack.bias)
    return y.reshape(*lead, pack.out_features).to(x.dtype)
