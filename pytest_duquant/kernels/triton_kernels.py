"""Triton kernels for DuQuant W4A8 (imported lazily: only on a CUDA machine with triton).

Kernels (each has a twin in `reference.py`):
  _act_quant_kernel   x -> gather(perm) -> block rotation -> per-token int8 codes + scales   (one row tile
                      per program, two passes over K: amax, then recompute + quantize). Large M.
  _act_chunk_kernel   one (row tile, 64-column chunk) per program; MODE 0 stores x_t (fp32) and per-row
                      partial max|x_t| (small-M path: the GEMM quantizes in its loop); MODE 1 static
                      per-channel fake quant (simulated path); MODE 2 transform only.
  _w4a8_fused_small_kernel  M <= 64 in one launch: rotation chunk per program -> grid barrier -> quantize ->
                      int8 x int4 swap-AB GEMM slice -> split-K fix-up + epilogue (opt-in path "F").
  _w4a8_gemm_kernel   int8 activations (or fp32 x_t quantized in the K loop) x packed int4 weights,
                      int32 tensor-core accumulation, epilogue: * s_a * s_w, restore rotation (block-
                      diagonal tile product), + bias; optional split-K with an in-kernel fix-up (the last
                      K-slice of a tile sums the partials; counters reset themselves).

Rotation chunks: a 64-wide output chunk c of x_t is x[:, cols] @ Rc, where for block b <= 64 cols are the
64 channels of the chunk and Rc the 64x64 block-diagonal made of 64/b blocks (built by a masked load from
the compact [nb, b, b] tensor), and for b > 64 cols are the b channels of the block and Rc its 64 columns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from pytest_duquant.kernels.packing import PACK_GROUP
from pytest_duquant.kernels.packs import CHUNK, SimPack, W4A8Pack


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
    r = tl.load(r_ptr + ridx, mask=rmask, other=0.0)
    return tl.dot(x.to(r.dtype), r)


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
):
    pid_m = tl.program_id(0)
    c = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < M
    v = _rot_chunk(x_ptr, stride_xm, perm_ptr, r_ptr, rows, rmask, c, B, W, HAS_PERM)
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
        pc = tl.arange(0, NPM_P2)
        pm = tl.load(
            aux_ptr + rows[:, None] * (K // 64) + pc[None, :],
            mask=rmask[:, None] & (pc < K // 64)[None, :],
            other=0.0,
        )
        sa = tl.maximum(tl.max(pm, axis=1) / QMAX, 1e-8)
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
    w32 = tl.load(p_ptr + rn[:, None] * (K // 2) + g * 64 + kk[None, :], mask=m, other=0).to(tl.int32)
    base = w_ptr + rn[:, None] * K + g * 128 + kk[None, :]
    tl.store(base, ((w32 << 28) >> 28).to(tl.int8), mask=m)
    tl.store(base + 64, ((w32 << 24) >> 28).to(tl.int8), mask=m)


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
    n_kt = K // 128
    per = tl.cdiv(n_kt, SPLIT_K)
    kt0 = pid_k * per
    kt1 = tl.minimum(kt0 + per, n_kt)
    if A_FLOAT:
        pc = tl.arange(0, NPM_P2)
        pm = tl.load(
            pm_ptr + rm[:, None] * NPM + pc[None, :], mask=mmask[:, None] & (pc < NPM)[None, :], other=0.0
        )
        sa = tl.maximum(tl.max(pm, axis=1) / QMAX, 1e-8)
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
        wp = tl.load(w_base + kt * 64, mask=nmask[:, None], other=0)
        w32 = wp.to(tl.int32)
        w_lo = ((w32 << 28) >> 28).to(tl.int8)
        w_hi = ((w32 << 24) >> 28).to(tl.int8)
        if A_FLOAT:
            xl = tl.load(a_base + kt * 128, mask=mmask[:, None], other=0.0)
            xh = tl.load(a_base + kt * 128 + 64, mask=mmask[:, None], other=0.0)
            al = tl.minimum(tl.maximum(libdevice.rint(xl * inv[:, None]), -QMAX - 1.0), QMAX * 1.0).to(
                tl.int8
            )
            ah = tl.minimum(tl.maximum(libdevice.rint(xh * inv[:, None]), -QMAX - 1.0), QMAX * 1.0).to(
                tl.int8
            )
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
def _w4a8_gemm_swap_kernel(
    a_ptr,
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
    NPM_P2: tl.constexpr,
    QMAX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESTORE: tl.constexpr,
    BO: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BT: tl.constexpr,
    BW: tl.constexpr,
):
    """Small-M variant ("swap AB"): acc[BW weights, BT tokens] = W_tile @ A_tileᵀ, so the unpacked weight is
    the wgmma A operand (from registers) and one program covers up to BT tokens (weights read once)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rt = pid_m * BT + tl.arange(0, BT)
    rw = pid_n * BW + tl.arange(0, BW)
    tmask = rt < M
    wmask = rw < N
    kk = tl.arange(0, 64)
    n_kt = K // 128
    per = tl.cdiv(n_kt, SPLIT_K)
    kt0 = pid_k * per
    kt1 = tl.minimum(kt0 + per, n_kt)
    pc = tl.arange(0, NPM_P2)
    pm = tl.load(
        pm_ptr + rt[:, None] * NPM + pc[None, :], mask=tmask[:, None] & (pc < NPM)[None, :], other=0.0
    )
    sa = tl.maximum(tl.max(pm, axis=1) / QMAX, 1e-8)
    inv = 1.0 / sa
    acc = tl.zeros((BW, BT), dtype=tl.int32)
    a_base = a_ptr + rt[:, None] * stride_am + kk[None, :]
    w_base = w_ptr + rw[:, None] * (K // 2) + kk[None, :]
    for kt in range(kt0, kt1):
        wp = tl.load(w_base + kt * 64, mask=wmask[:, None], other=0)
        w32 = wp.to(tl.int32)
        w_lo = ((w32 << 28) >> 28).to(tl.int8)
        w_hi = ((w32 << 24) >> 28).to(tl.int8)
        xl = tl.load(a_base + kt * 128, mask=tmask[:, None], other=0.0)
        xh = tl.load(a_base + kt * 128 + 64, mask=tmask[:, None], other=0.0)
        al = tl.minimum(tl.maximum(libdevice.rint(xl * inv[:, None]), -QMAX - 1.0), QMAX * 1.0).to(tl.int8)
        ah = tl.minimum(tl.maximum(libdevice.rint(xh * inv[:, None]), -QMAX - 1.0), QMAX * 1.0).to(tl.int8)
        acc = tl.dot(w_lo, tl.trans(al), acc, out_dtype=tl.int32)
        acc = tl.dot(w_hi, tl.trans(ah), acc, out_dtype=tl.int32)
    sw = tl.load(sw_ptr + rw, mask=wmask, other=0.0)
    y = acc.to(tl.float32) * sw[:, None] * sa[None, :]  # [BW, BT] = y_tᵀ tile
    omask = wmask[:, None] & tmask[None, :]
    tile = rt[None, :] * N + rw[:, None]
    if SPLIT_K > 1:
        tl.store(ws_ptr + pid_k * M * N + tile, y, mask=omask)
        tl.debug_barrier()
        count = tl.atomic_add(cnt_ptr + pid_m * tl.num_programs(0) + pid_n, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            y = tl.zeros((BW, BT), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                y += tl.load(ws_ptr + s * M * N + tile, mask=omask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(cnt_ptr + pid_m * tl.num_programs(0) + pid_n, 0)
            _swap_finish(
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
                HAS_BIAS,
                RESTORE,
                BO,
                BW,
            )
    else:
        _swap_finish(
            y, rt, rw, pid_n, N, omask, wmask, bias_ptr, ro_ptr, out_ptr, stride_om, HAS_BIAS, RESTORE, BO, BW
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


@triton.jit
def _grid_sync(bar_ptr, G):
    """Grid-wide barrier (every program of the launch must be resident: the launcher keeps G <= #SMs).
    Release: the CTA barrier then an acq_rel atomic by one thread; acquire: poll, then the CTA barrier."""
    tl.debug_barrier()
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel") + 1
    while arrived < G:
        arrived = tl.atomic_add(bar_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _fused_step(acc, wp, a_ptr, rt, tmask, kt, K, inv, QMAX: tl.constexpr, CODES: tl.constexpr):
    kk = tl.arange(0, 64)
    w32 = wp.to(tl.int32)
    w_lo = ((w32 << 28) >> 28).to(tl.int8)
    w_hi = ((w32 << 24) >> 28).to(tl.int8)
    base = a_ptr + rt[:, None] * K + kt * 128 + kk[None, :]
    if CODES:
        al = tl.load(base, mask=tmask[:, None], other=0, cache_modifier=".cg")
        ah = tl.load(base + 64, mask=tmask[:, None], other=0, cache_modifier=".cg")
    else:
        xl = tl.load(base, mask=tmask[:, None], other=0.0, cache_modifier=".cg")
        xh = tl.load(base + 64, mask=tmask[:, None], other=0.0, cache_modifier=".cg")
        al = tl.minimum(tl.maximum(libdevice.rint(xl * inv[:, None]), -QMAX - 1.0), QMAX * 1.0).to(tl.int8)
        ah = tl.minimum(tl.maximum(libdevice.rint(xh * inv[:, None]), -QMAX - 1.0), QMAX * 1.0).to(tl.int8)
    acc = tl.dot(w_lo, tl.trans(al), acc, out_dtype=tl.int32)
    acc = tl.dot(w_hi, tl.trans(ah), acc, out_dtype=tl.int32)
    return acc


@triton.jit
def _w4a8_fused_small_kernel(
    x_ptr,
    perm_ptr,
    r_ptr,
    a_ptr,
    pm_ptr,
    w_ptr,
    sw_ptr,
    bias_ptr,
    ro_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    bar_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    G,
    NPM_P2: tl.constexpr,
    QMAX: tl.constexpr,
    B: tl.constexpr,
    W: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESTORE: tl.constexpr,
    BO: tl.constexpr,
    SPLIT_K: tl.constexpr,
    KT_PER: tl.constexpr,
    BT: tl.constexpr,
    BW: tl.constexpr,
    CODES: tl.constexpr,
):
    """M <= 64 in ONE launch (grid G <= #SMs, all resident):
    (0) each program issues the loads of its int4 weight slice [BW rows, KT_PER*128 cols] (HBM latency
        overlaps what follows); (1) program p rotates 64-column chunk p of x (gather + block rotation, bf16
        tensor cores, fp32) and stores x_t (or keeps it) and the per-token partial max; grid barrier;
        [CODES: each chunk is quantized to int8 with the full per-token scale and stored; second barrier];
        (2) program (n-tile,
        K-slice) quantizes (or loads) its x_t slice, int8 x int4 wgmma with weights as the M side, epilogue as
        the swap kernel (split-K fix-up, * s_a * s_w, restore tile product, bias)."""
    pid = tl.program_id(0)
    n_t = tl.cdiv(N, BW)
    pid_n = pid % n_t
    pid_k = pid // n_t
    rt = tl.arange(0, BT)
    tmask = rt < M
    rw = pid_n * BW + tl.arange(0, BW)
    wmask = (rw < N) & (pid_k < SPLIT_K)
    kk = tl.arange(0, 64)
    NPM = K // 64
    kt0 = tl.minimum(pid_k, SPLIT_K - 1) * KT_PER
    # (0) weight slice loads, issued first
    w_base = w_ptr + rw[:, None] * (K // 2) + kt0 * 64 + kk[None, :]
    wp0 = tl.load(w_base, mask=wmask[:, None], other=0)
    if KT_PER > 1:
        wp1 = tl.load(w_base + 64, mask=wmask[:, None], other=0)
    if KT_PER > 2:
        wp2 = tl.load(w_base + 128, mask=wmask[:, None], other=0)
    if KT_PER > 3:
        wp3 = tl.load(w_base + 192, mask=wmask[:, None], other=0)
    # (1) rotation of chunk c = pid (programs past the last chunk redo chunk pid % NPM and store nothing)
    c = pid % NPM
    own = pid < NPM
    v = _rot_chunk(x_ptr, stride_xm, perm_ptr, r_ptr, rt, tmask, c, B, W, HAS_PERM)
    cols = c * 64 + tl.arange(0, 64)
    tl.store(pm_ptr + rt * NPM + c, tl.max(tl.abs(v), axis=1), mask=tmask & own)
    if not CODES:
        tl.store(a_ptr + rt[:, None] * K + cols[None, :], v, mask=tmask[:, None] & own)
    _grid_sync(bar_ptr, G)
    pc = tl.arange(0, NPM_P2)
    pm = tl.load(
        pm_ptr + rt[:, None] * NPM + pc[None, :],
        mask=tmask[:, None] & (pc < NPM)[None, :],
        other=0.0,
        cache_modifier=".cg",
    )
    sa = tl.maximum(tl.max(pm, axis=1) / QMAX, 1e-8)
    inv = 1.0 / sa
    if CODES:
        q = libdevice.rint(tl.math.div_rn(v, tl.broadcast_to(sa[:, None], (BT, 64))))
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
        tl.store(a_ptr + rt[:, None] * K + cols[None, :], q.to(tl.int8), mask=tmask[:, None] & own)
        _grid_sync(bar_ptr + 1, G)
    done = tl.atomic_add(bar_ptr + 2, 1, sem="acq_rel")
    if done == G - 1:  # everyone has passed the barriers: reset them for the next launch
        tl.atomic_xchg(bar_ptr, 0)
        tl.atomic_xchg(bar_ptr + 1, 0)
        tl.atomic_xchg(bar_ptr + 2, 0)
    # (2) GEMM slice
    if pid_k < SPLIT_K:
        acc = tl.zeros((BW, BT), dtype=tl.int32)
        acc = _fused_step(acc, wp0, a_ptr, rt, tmask, kt0, K, inv, QMAX, CODES)
        if KT_PER > 1:
            acc = _fused_step(acc, wp1, a_ptr, rt, tmask, kt0 + 1, K, inv, QMAX, CODES)
        if KT_PER > 2:
            acc = _fused_step(acc, wp2, a_ptr, rt, tmask, kt0 + 2, K, inv, QMAX, CODES)
        if KT_PER > 3:
            acc = _fused_step(acc, wp3, a_ptr, rt, tmask, kt0 + 3, K, inv, QMAX, CODES)
        for kt in range(kt0 + 4, kt0 + KT_PER):
            wp = tl.load(w_base + (kt - kt0) * 64, mask=wmask[:, None], other=0)
            acc = _fused_step(acc, wp, a_ptr, rt, tmask, kt, K, inv, QMAX, CODES)
        sw = tl.load(sw_ptr + rw, mask=wmask, other=0.0)
        y = acc.to(tl.float32) * sw[:, None] * sa[None, :]  # [BW, BT] = y_tᵀ tile
        omask = wmask[:, None] & tmask[None, :]
        tile = rt[None, :] * N + rw[:, None]
        if SPLIT_K > 1:
            tl.store(ws_ptr + pid_k * M * N + tile, y, mask=omask)
            tl.debug_barrier()
            count = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if count == SPLIT_K - 1:
                y = tl.zeros((BW, BT), dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    y += tl.load(ws_ptr + s * M * N + tile, mask=omask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
                _swap_finish(
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
                    HAS_BIAS,
                    RESTORE,
                    BO,
                    BW,
                )
        else:
            _swap_finish(
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
                HAS_BIAS,
                RESTORE,
                BO,
                BW,
            )


# ---- launchers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    # "S": chunk kernel -> fp32 x_t + partial max, quantized in the GEMM's loop (small M);
    # "Q": two chunk-parallel passes -> int8 codes, weight unpacked to int8 once, int8 x int8 GEMM (large M);
    # "L": one two-pass kernel per row tile -> int8 codes (reference variant; slow: little parallelism)
    path: str = "L"
    bm: int = 64
    bn: int = 128
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    act_bm: int = 16
    act_warps: int = 4
    group_m: int = 8
    swap: bool = False  # small M: weights as the MMA's M side, tokens (bm of them) as its N side
    codes: bool = False  # path "F": int8 codes stored between two grid barriers (else fp32 x_t, one barrier)

    def tag(self) -> str:
        if self.path == "F":
            return f"F/bt{self.bm}/bw{self.bn}/sk{self.split_k}/w{self.warps}/c{int(self.codes)}"
        return (
            f"{'X' if self.swap else self.path}/bm{self.bm}/bn{self.bn}/sk{self.split_k}/w{self.warps}"
            f"/s{self.stages}/abm{self.act_bm}" + (f"/aw{self.act_warps}" if self.act_warps != 4 else "")
        )


def _divisor_at_most(n: int, cap: int) -> int:
    for s in range(max(1, min(cap, n)), 0, -1):
        if n % s == 0:
            return s
    return 1


def pick_config(m: int, n: int, k: int) -> GemmConfig:
    """Heuristic configuration (from the H100 sweep of scripts/gpu_bench.py --sweep; docs/gpu-notes.md).

    M <= 64: chunk activation kernel + swap-AB GEMM in 16-token tiles, split-K to fill the 132 SMs (the
    one-launch path "F" is opt-in: measured slower, docs/gpu-notes.md v4). M <= 256: the token-major GEMM
    on fp32 x_t. Larger M: path "Q" (int8 codes, weight unpacked once per call)."""
    n_kt = k // PACK_GROUP
    if m <= 64:
        # Two launches (chunk act kernel + swap-AB GEMM). The one-launch kernel (path "F",
        # `fused_small_config`) measured slower on every expert shape (docs/gpu-notes.md v4): opt-in.
        # 16-token tiles for every M <= 64 (v4 prediction: M=50 near the M=16 time instead of 1.6x it).
        bt = 16
        bw = 64
        n_t = -(-n // bw)
        split = _divisor_at_most(n_kt, max(1, (128 if n >= 4096 else 256) // n_t))
        return GemmConfig(path="S", bm=bt, bn=bw, split_k=split, warps=4, stages=4, act_bm=16, swap=True)
    if m <= 256:
        bm, bn = 64, 64
        tiles = -(-m // bm) * -(-n // bn)
        split = _divisor_at_most(n_kt, max(1, 132 // tiles))
        return GemmConfig(path="S", bm=bm, bn=bn, split_k=split, warps=4, stages=3, act_bm=32)
    return GemmConfig(path="Q", bm=128, bn=128, split_k=1, warps=8, stages=3, act_bm=64)


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
):
    """Chunk-parallel activation transform. mode 0: (x_t, partial max [M, K/64]); 1: fake quant; 2: x_t."""
    m, k = x2d.shape
    out = _empty((m, k), out_dtype, x2d.device)
    if mode == 0:
        aux = _empty((m, k // CHUNK), torch.float32, x2d.device)
    b, w = _rot_params(block)
    _act_chunk_kernel[(triton.cdiv(m, bm), k // CHUNK)](
        x2d,
        perm if perm is not None else r_in,
        r_in,
        out,
        aux if aux is not None else out,
        m,
        k,
        x2d.stride(0),
        out.stride(0),
        MODE=mode,
        QMAX=qmax,
        B=b,
        W=w,
        HAS_PERM=perm is not None,
        BM=bm,
        num_warps=warps,
    )
    return (out, aux) if mode == 0 else out


def act_quant_chunked(x2d: torch.Tensor, pack: W4A8Pack, *, bm: int = 64, warps: int = 4):
    """Large-M activation side, chunk-parallel: pass 1 partial max|x_t|, pass 2 recompute + int8 codes."""
    m, k = x2d.shape
    pm = _empty((m, k // CHUNK), torch.float32, x2d.device)
    q = _empty((m, k), torch.int8, x2d.device)
    s = _empty((m,), torch.float32, x2d.device)
    b, w = _rot_params(pack.block)
    perm = pack.perm if pack.perm is not None else pack.r_in
    grid = (triton.cdiv(m, bm), k // CHUNK)
    _act_chunk_kernel[grid](
        x2d,
        perm,
        pack.r_in,
        q,
        pm,
        m,
        k,
        x2d.stride(0),
        q.stride(0),
        MODE=3,
        QMAX=pack.qmax_a,
        B=b,
        W=w,
        HAS_PERM=pack.perm is not None,
        BM=bm,
        scale_ptr=s,
        NPM_P2=triton.next_power_of_2(k // CHUNK),
        num_warps=warps,
    )
    _act_chunk_kernel[grid](
        x2d,
        perm,
        pack.r_in,
        q,
        pm,
        m,
        k,
        x2d.stride(0),
        q.stride(0),
        MODE=4,
        QMAX=pack.qmax_a,
        B=b,
        W=w,
        HAS_PERM=pack.perm is not None,
        BM=bm,
        scale_ptr=s,
        NPM_P2=triton.next_power_of_2(k // CHUNK),
        num_warps=warps,
    )
    return q, s


def act_quant_large(x2d: torch.Tensor, pack: W4A8Pack, cfg: GemmConfig):
    """Large-M activation side (path "Q"). With a permutation, x is first gathered once by `index_select`
    (consecutive threads read one row: the row's sectors are reused in L1) so the two chunk passes read
    contiguous 128-byte rows instead of a scattered 2-byte gather per element per pass (v4: 70 -> ~29 µs at
    M=4096, K=1024)."""
    if pack.perm is not None:
        x2d = x2d.index_select(1, pack.perm)
        pack = dataclasses.replace(pack, perm=None)
    return act_quant_chunked(x2d, pack, bm=cfg.act_bm, warps=cfg.act_warps)


def unpack_weight_int8(pack: W4A8Pack) -> torch.Tensor:
    """int8 codes [N, K] (natural order) from the packed weight: a per-call temporary for the large-M GEMM."""
    n, k = pack.out_features, pack.in_features
    w = _empty((n, k), torch.int8, pack.w_packed.device)
    _unpack_int4_kernel[(triton.cdiv(n, 64), k // PACK_GROUP)](pack.w_packed, w, n, k, BN=64, num_warps=4)
    return w


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
    registers."""
    m, k = a.shape
    n = pack.out_features
    out = _empty((m, n), out_dtype, a.device)
    restore = epilogue and pack.r_out is not None
    fuse_restore = restore and cfg.bn % pack.block_out == 0 and pack.block_out >= 16
    has_bias = epilogue and pack.bias is not None and (fuse_restore or not restore)
    bm, bn, split = cfg.bm, cfg.bn, cfg.split_k
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    ws = _empty((split, m, n), torch.float32, a.device) if split > 1 else out
    cnt = _counters(a.device, tiles) if split > 1 else pack.w_scales
    npm = k // CHUNK
    out_k = out if not (restore and not fuse_restore) else _empty((m, n), torch.float32, a.device)
    if cfg.swap:
        if not a_float:
            raise ValueError("the swap-AB GEMM takes float x_t (path S)")
        fuse_restore = restore and bn % pack.block_out == 0 and pack.block_out >= 16
        n_t = triton.cdiv(n, bn)
        _w4a8_gemm_swap_kernel[(n_t, split, triton.cdiv(m, bm))](
            a,
            a_scale_or_pmax,
            pack.w_packed,
            pack.w_scales,
            pack.bias if has_bias else pack.w_scales,
            pack.r_out if fuse_restore else pack.w_scales,
            out_k,
            ws,
            _counters(a.device, n_t * triton.cdiv(m, bm)) if split > 1 else pack.w_scales,
            m,
            n,
            k,
            a.stride(0),
            out_k.stride(0),
            npm,
            NPM_P2=triton.next_power_of_2(npm),
            QMAX=pack.qmax_a,
            HAS_BIAS=has_bias,
            RESTORE=fuse_restore,
            BO=max(pack.block_out, 1),
            SPLIT_K=split,
            BT=bm,
            BW=bn,
            num_warps=cfg.warps,
            num_stages=cfg.stages,
        )
    else:
        _w4a8_gemm_kernel[(tiles, split)](
            a,
            a_scale_or_pmax,
            a_scale_or_pmax,
            pack.w_packed if w_int8 is None else w_int8,
            pack.w_scales,
            pack.bias if has_bias else pack.w_scales,
            pack.r_out if fuse_restore else pack.w_scales,
            out_k,
            ws,
            cnt,
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
    if restore and not fuse_restore:  # block_out does not tile BN: a separate small step
        nbo, bo, _ = pack.r_out.shape
        y = torch.einsum("mnb,nbc->mnc", out_k.view(m, nbo, bo), pack.r_out.float()).reshape(m, n)
        if pack.bias is not None:
            y = y + pack.bias
        out.copy_(y)
    return out


_BARRIERS: dict = {}
_SMS: dict = {}


def _sm_count(device) -> int:
    dev = torch.device(device)
    key = dev.index if dev.index is not None else torch.cuda.current_device()
    if key not in _SMS:
        _SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SMS[key]


def _barrier(device) -> torch.Tensor:
    buf = _BARRIERS.get(device)
    if buf is None:
        buf = torch.zeros(4, dtype=torch.int32, device=device)
        _BARRIERS[device] = buf
    return buf


def fused_small_config(
    m: int,
    n: int,
    k: int,
    *,
    bw: int = 64,
    codes: bool | None = None,
    split: int | None = None,
    sms: int = 132,
) -> GemmConfig | None:
    """Config of the one-launch small-M kernel (path "F"), or None when it does not apply (M > 64, or the grid
    would exceed the SM count: the grid barrier needs every program resident)."""
    if m > 64:
        return None
    n_kt = k // PACK_GROUP
    n_t = -(-n // bw)
    if split is None:
        split = _divisor_at_most(n_kt, max(1, sms // n_t))
    if n_kt % split or max(n_t * split, k // CHUNK) > sms:
        return None
    if codes is None:
        codes = n >= 2048  # int8 codes (2 barriers) where many N tiles re-read the activations (sweep)
    bt = 16 if m <= 16 else (32 if m <= 32 else 64)
    return GemmConfig(
        path="F", bm=bt, bn=bw, split_k=split, warps=4 if bw == 64 else 8, stages=4, codes=codes, swap=True
    )


def w4a8_fused_small(
    x2d: torch.Tensor, pack: W4A8Pack, cfg: GemmConfig, *, out_dtype=None, epilogue: bool = True
) -> torch.Tensor:
    """Real W4A8 forward for M <= 64 in one launch (`_w4a8_fused_small_kernel`). `epilogue=False` leaves out
    bias and restore (integer tests)."""
    m, k = x2d.shape
    n = pack.out_features
    bt, bw, split = cfg.bm, cfg.bn, cfg.split_k
    if m > bt or bt > 64:
        raise ValueError(f"w4a8_fused_small: M={m} needs bt >= M and bt <= 64 (got bt={bt})")
    n_kt = k // PACK_GROUP
    n_t = triton.cdiv(n, bw)
    npm = k // CHUNK
    grid = max(n_t * split, npm)
    if n_kt % split or grid > _sm_count(x2d.device):
        raise ValueError(
            f"w4a8_fused_small: split_k={split} must divide K/128={n_kt} and the grid ({grid}) fit the SMs"
        )
    out_dtype = out_dtype or x2d.dtype
    out = _empty((m, n), out_dtype, x2d.device)
    restore = epilogue and pack.r_out is not None
    if restore and not (bw % pack.block_out == 0 and pack.block_out >= 16):
        raise ValueError(f"w4a8_fused_small: block_out={pack.block_out} does not tile bw={bw}")
    has_bias = epilogue and pack.bias is not None
    a = _empty((m, k), torch.int8 if cfg.codes else torch.float32, x2d.device)
    pm = _empty((m, npm), torch.float32, x2d.device)
    ws = _empty((split, m, n), torch.float32, x2d.device) if split > 1 else out
    b, w = _rot_params(pack.block)
    _w4a8_fused_small_kernel[(grid,)](
        x2d,
        pack.perm if pack.perm is not None else pack.r_in,
        pack.r_in,
        a,
        pm,
        pack.w_packed,
        pack.w_scales,
        pack.bias if has_bias else pack.w_scales,
        pack.r_out if restore else pack.w_scales,
        out,
        ws,
        _counters(x2d.device, n_t) if split > 1 else pack.w_scales,
        _barrier(x2d.device),
        m,
        n,
        k,
        x2d.stride(0),
        out.stride(0),
        grid,
        NPM_P2=triton.next_power_of_2(npm),
        QMAX=pack.qmax_a,
        B=b,
        W=w,
        HAS_PERM=pack.perm is not None,
        HAS_BIAS=has_bias,
        RESTORE=restore,
        BO=max(pack.block_out, 1),
        SPLIT_K=split,
        KT_PER=n_kt // split,
        BT=bt,
        BW=bw,
        CODES=cfg.codes,
        num_warps=cfg.warps,
        num_stages=1,
    )
    return out


def w4a8_linear(x: torch.Tensor, pack: W4A8Pack, cfg: GemmConfig | None = None) -> torch.Tensor:
    """Real W4A8 forward: activation kernel + int8 x int4 GEMM; returns x.dtype [..., N]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pack.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if cfg is None:
        cfg = pick_config(m, pack.out_features, pack.in_features)
    if cfg.path == "F":
        fusable = pack.r_out is None or (cfg.bn % pack.block_out == 0 and pack.block_out >= 16)
        grid = max(triton.cdiv(pack.out_features, cfg.bn) * cfg.split_k, pack.in_features // CHUNK)
        if fusable and m <= cfg.bm and grid <= _sm_count(x2.device):
            return w4a8_fused_small(x2, pack, cfg).reshape(*lead, pack.out_features)
        cfg = dataclasses.replace(cfg, path="S", swap=True, stages=4)  # the two-launch swap-AB path
    if cfg.path == "L":
        q, s = act_quant(x2, pack, bm=cfg.act_bm, warps=cfg.act_warps)
        y = w4a8_gemm(q, s, pack, cfg, a_float=False, out_dtype=x.dtype)
    elif cfg.path == "Q":
        q, s = act_quant_large(x2, pack, cfg)
        y = w4a8_gemm(q, s, pack, cfg, a_float=False, out_dtype=x.dtype, w_int8=unpack_weight_int8(pack))
    else:
        xt, pm = act_chunks(x2, pack.perm, pack.r_in, pack.block, mode=0, bm=cfg.act_bm, warps=cfg.act_warps)
        y = w4a8_gemm(xt, pm, pack, cfg, a_float=True, out_dtype=x.dtype)
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
