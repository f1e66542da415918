"""Static activation calibration: running max of per-call per-channel percentiles of |x|.

docs/contract.md, "Algorithm" step 6.
"""

from __future__ import annotations

import torch

_QUANTILE_LIMIT = 1 << 24  # torch.quantile refuses larger inputs
_MIN_PCT = 1e-6


def percentile_abs(x: torch.Tensor, pct: float) -> torch.Tensor:
    """Per channel (last dim) `pct` percentile of |x| over all other dims, linear interpolation; computed in
    float32, or in float64 for float64 inputs (a float64 measurement keeps float64 scales: its float order no
    longer moves activation codes across rounding boundaries)."""
    a = x.detach().abs().to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, x.shape[-1])
    q = pct / 100.0
    if a.numel() <= _QUANTILE_LIMIT:
        return torch.quantile(a, q, dim=0)
    s = torch.sort(a, dim=0).values
    pos = q * (s.shape[0] - 1)
    lo = int(pos)
    hi = min(lo + 1, s.shape[0] - 1)
    return torch.lerp(s[lo], s[hi], pos - lo)


class PercentileObserver:
    """Running max over calls of the per-channel percentile of |x|; `scale(bits)` = pct / qmax."""

    def __init__(self, pct: float):
        self.pct = pct
        self.calls = 0
        self.running: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        p = percentile_abs(x, self.pct).clamp_min(_MIN_PCT)
        self.running = p if self.running is None else torch.maximum(self.running, p.to(self.running.device))
        self.calls += 1

    def scale(self, bits: int) -> torch.Tensor:
        from pytest_duquant.numerics.quantizers import qmax

        if self.running is None:
            raise RuntimeError("no activations observed yet")
        return (self.running / qmax(bits)).clamp_min(_MIN_PCT)
