"""Torch twins of the Triton kernels: the same math on the same packed tensors, in float32/float64.

Each function here is what a kernel in `triton_kernels.py` must reproduce:
  transform_ref          <- the rotation step of every activation kernel
  act_quant_ref          <- `act_quant` (gather + rotation + per-token dynamic quantization)
  int_acc_ref            <- the int32 accumulator of the int8 x int4 GEMM (exact)
  w4a8_linear_ref        <- `w4a8_linear` (activation kernel + GEMM + epilogue)
  fakequant_act_ref      <- `sim_act` (gather + rotation + static per-channel fake quant)
  simulated_linear_ref   <- `simulated_linear`
  geglu_ref              <- the GeGLU prologue of the small-M activation kernel (gelu_tanh(gate) * up, bf16)
  w4a8_group_ref         <- `w4a8_small` on a W4A8Group (every member on the same input, side by side)
"""

from __future__ import annotations

import torch

from pytest_duquant.kernels.packing import unpack_int4
from pytest_duquant.kernels.packs import SimPack, W4A8Group, W4A8Pack

MIN_SCALE = 1e-8  # same floor as pytest_duquant.numerics.quantizers


def _blockdiag_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    nb, b, _ = blocks.shape
    lead = x.shape[:-1]
    return torch.einsum("...nb,nbc->...nc", x.reshape(*lead, nb, b), blocks).reshape(*lead, nb * b)


def transform_ref(x: torch.Tensor, perm: torch.Tensor | None, r_in: torch.Tensor) -> torch.Tensor:
    """x[:, perm] @ blockdiag(r_in) in float32 (r_in used exactly as stored, upcast)."""
    x = x.to(torch.float32)
    if perm is not None:
        x = x.index_select(-1, perm.long())
    return _blockdiag_apply(x, r_in.to(torch.float32))


def round_half_even(v: torch.Tensor) -> torch.Tensor:
    return torch.round(v)  # torch.round rounds half to even, as the kernels do


def act_quant_ref(x2d: torch.Tensor, perm, r_in, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic quantization of x_t: scale = max(max|x_t| / qmax, 1e-8), codes = rne(x_t / scale)."""
    xt = transform_ref(x2d, perm, r_in)
    scale = (xt.abs().amax(dim=1) / qmax).clamp_min(MIN_SCALE)
    codes = torch.clamp(round_half_even(xt / scale[:, None]), -qmax - 1, qmax).to(torch.int8)
    return codes, scale


def int_acc_ref(a_codes: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """Exact integer product a_codes [M, K] @ w_codesᵀ [K, N] as int64 (float64 is exact below 2^53)."""
    return (a_codes.to(torch.float64) @ w_codes.to(torch.float64).T).to(torch.int64)


def epilogue_ref(acc: torch.Tensor, a_scale, w_scales, bias, r_out) -> torch.Tensor:
    y = acc.to(torch.float64) * a_scale.to(torch.float64)[:, None] * w_scales.to(torch.float64)[None, :]
    if r_out is not None:
        y = _blockdiag_apply(y, r_out.to(torch.float64))
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y


def w4a8_linear_ref(x: torch.Tensor, pack: W4A8Pack) -> torch.Tensor:
    """Float64 result of the real W4A8 path (before the cast to x.dtype), shape [..., N]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pack.in_features)
    codes, scale = act_quant_ref(x2, pack.perm, pack.r_in, pack.qmax_a)
    acc = int_acc_ref(codes, unpack_int4(pack.w_packed))
    y = epilogue_ref(acc, scale, pack.w_scales, pack.bias, pack.r_out)
    return y.reshape(*lead, pack.out_features)


def fakequant_act_ref(x2d: torch.Tensor, perm, r_in, act_scale, qmax: int) -> torch.Tensor:
    """Static per-channel fake quant of x_t (float32): rne(x_t / s_c) clamped, times s_c."""
    xt = transform_ref(x2d, perm, r_in)
    if act_scale is None:
        return xt
    s = act_scale.to(torch.float32)
    return torch.clamp(round_half_even(xt / s), -qmax - 1, qmax) * s


def simulated_linear_ref(x: torch.Tensor, pack: SimPack) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pack.in_features)
    xq = fakequant_act_ref(x2, pack.perm, pack.r_in, pack.act_scale, pack.qmax_a)
    y = xq.to(torch.float64) @ pack.weight.to(torch.float64).T
    if pack.bias is not None:
        y = y + pack.bias.to(torch.float64)
    return y.reshape(*lead, pack.out_features)


def geglu_ref(gate_up: torch.Tensor, width: int) -> torch.Tensor:
    """gelu_tanh(gate) * up as the eager bf16 model computes it (each op rounds to the input dtype);
    gate = columns [0, width), up = [width, 2 width)."""
    g, u = gate_up[..., :width], gate_up[..., width : 2 * width]
    return torch.nn.functional.gelu(g, approximate="tanh") * u


def w4a8_group_ref(x: torch.Tensor, group: W4A8Group) -> torch.Tensor:
    """Float64 [..., N_total]: each member's w4a8_linear_ref on the same x, concatenated."""
    return torch.cat([w4a8_linear_ref(x, p) for p in group.packs], dim=-1)
