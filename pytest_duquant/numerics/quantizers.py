"""Symmetric quantizers (docs/contract.md, "Algorithm" steps 5-6)."""

from __future__ import annotations

import torch

MSE_GRID = (0.5, 0.75, 1.0, 1.25, 1.5)
_MIN_SCALE = 1e-8


def qmax(bits: int) -> int:
    """Largest positive code of a signed `bits`-bit integer; codes lie in [-qmax - 1, qmax]."""
    return (1 << (bits - 1)) - 1


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(x / scale), -qmax - 1, qmax) (round half to even), same dtype as x."""
    q = qmax(bits)
    return torch.clamp(torch.round(x / scale), -q - 1, q)


def fake_quant_sym(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize with a symmetric scale (broadcast against x)."""
    return quantize_codes(x, scale, bits) * scale


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else (torch.int16 if bits <= 16 else torch.int32)


def quantize_weight_rtn(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain round-to-nearest per output channel with scale max|w| / qmax. Returns (codes, scales[out])."""
    w = weight.detach().to(torch.float32)
    scales = (w.abs().amax(dim=1) / qmax(bits)).clamp_min(_MIN_SCALE)
    return quantize_codes(w, scales[:, None], bits).to(_code_dtype(bits)), scales


def quantize_weight_mse(
    weight: torch.Tensor, bits: int, grid: tuple[float, ...] = MSE_GRID
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel, the scale (max|w| / qmax) / a for a in `grid` with the least reconstruction MSE.

    Returns (codes [out, in] integer tensor, scales [out] float32). Ties go to the first grid entry.
    The same arithmetic as `quantize_codes(w, s) * s - w`, done in place in one scratch buffer (quantizing
    the 126 expert linears is dominated by these passes over the weights).
    """
    w = weight.detach().to(torch.float32)
    q = qmax(bits)
    base = (w.abs().amax(dim=1) / q).clamp_min(_MIN_SCALE)
    best_err = None
    best_scale = base
    scratch = torch.empty_like(w)
    for alpha in grid:
        s = (base / alpha)[:, None]
        t = torch.div(w, s, out=scratch).round_()
        if alpha > 1.0:  # a scale below max|w| / qmax: codes beyond the range are clipped
            t.clamp_(-q - 1, q)
        err = t.mul_(s).sub_(w).square_().mean(dim=1)
        if best_err is None:
            best_err, best_scale = err, s[:, 0]
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, s[:, 0], best_scale)
    codes = quantize_codes(w, best_scale[:, None], bits).to(_code_dtype(bits))
    return codes, best_scale


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization with one scale per token (row): scale = max|x_token| / qmax.

    Returns (codes with x's dtype, scales [..., 1]); dequantized value = codes * scales.
    """
    scales = (x.abs().amax(dim=-1, keepdim=True).to(torch.float32) / qmax(bits)).clamp_min(_MIN_SCALE)
    codes = quantize_codes(x.to(torch.float32), scales, bits)
    return codes, scales


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scales = quantize_per_token(x, bits)
    return (codes * scales).to(x.dtype)
