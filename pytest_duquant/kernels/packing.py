"""int4 weight packing (CPU and GPU, pure torch): two signed 4-bit codes per byte.

Layout (``PACK_GROUP`` = 128): along the input dimension K, each group of 128 consecutive codes is stored
as 64 bytes; byte ``i`` of group ``g`` holds code ``k = 128 g + i`` in its low nibble and code
``k = 128 g + 64 + i`` in its high nibble (two's complement nibbles, codes in [-8, 7]).

Splitting each group into a low half and a high half (instead of adjacent pairs) lets the GEMM kernel
unpack a [BN, 64] byte tile into two int8 [BN, 64] tiles that multiply two *contiguous* 64-wide slices
of the activation codes: no interleaving shuffle in registers.
"""

from __future__ import annotations

import torch

PACK_GROUP = 128
HALF = PACK_GROUP // 2


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dim() != 2:
        raise ValueError(f"pack_int4: codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"pack_int4: codes must be an integer tensor, got dtype {codes.dtype}")
    k = codes.shape[1]
    if k % PACK_GROUP:
        raise ValueError(f"pack_int4: in_features={k} must be a multiple of {PACK_GROUP}")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < -8 or hi > 7:
            raise ValueError(f"pack_int4: codes must lie in [-8, 7] (4-bit signed), got range [{lo}, {hi}]")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] integer in [-8, 7] -> packed uint8 [N, K // 2] (layout in the module docstring)."""
    _check_codes(codes)
    n, k = codes.shape
    c = codes.to(torch.int16).reshape(n, k // PACK_GROUP, 2, HALF) & 0xF
    packed = c[:, :, 0] | (c[:, :, 1] << 4)
    return packed.to(torch.uint8).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [N, K // 2] -> int8 codes [N, K]."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(
            f"unpack_int4: packed must be uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}"
        )
    n, kh = packed.shape
    if kh % HALF:
        raise ValueError(f"unpack_int4: packed width {kh} must be a multiple of {HALF}")
    p = packed.to(torch.int16).reshape(n, kh // HALF, HALF)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    lo = lo - ((lo & 8) << 1)
    hi = hi - ((hi & 8) << 1)
    return torch.stack([lo, hi], dim=2).reshape(n, kh * 2).to(torch.int8)
