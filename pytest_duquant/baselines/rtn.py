"""Plain round-to-nearest (RTN), the baseline DuQuant is measured against: a quantization method beside
DuQuant behind the same entry, ``quantize_model(model, RTNConfig(config))``.

RTN quantizes the layers `config` selects at the same bits and with the same activation scheme, with no
transform: per-output-channel weight RTN (scale max|w| / qmax) and, on the raw input, the static
per-input-channel ACT_PCT percentile scale calibrated on the same calls (or per-token with ACT_DYNAMIC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pytest_duquant.config import DuQuantConfig
from pytest_duquant.numerics import PercentileObserver, fake_quant_sym, quantize_weight_rtn
from pytest_duquant.numerics.quantizers import fake_quant_per_token


@dataclass(frozen=True)
class RTNConfig:
    """RTN on what `base` selects, at its bits (WBITS_DEFAULT/WBITS), ABITS, ACT_PCT and ACT_DYNAMIC."""

    base: DuQuantConfig

    method = "rtn"

    @property
    def enabled(self) -> bool:
        return self.base.enabled

    @property
    def preset(self) -> str:
        return f"rtn({self.base.preset})"

    def describe(self) -> str:
        return f"plain RTN at the settings of {self.base.describe()}"


class RTNLinear(nn.Module):
    """Plain round-to-nearest: per-output-channel weight RTN, activation quantization on the raw input."""

    quantized_linear = True

    def __init__(
        self,
        linear: nn.Linear,
        *,
        name: str,
        wbits: int,
        abits: int,
        act_pct: float,
        act_dynamic: bool = False,
    ):
        super().__init__()
        self.name, self.wbits, self.abits, self.act_dynamic = name, wbits, abits, act_dynamic
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if wbits < 16:
            codes, scales = quantize_weight_rtn(w, wbits)
            wq = codes.to(torch.float32) * scales[:, None]
        else:
            wq = w
        self.register_buffer("weight_q", wq.to(w.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.observer = PercentileObserver(act_pct)
        self.calibrating = False
        self.register_buffer("act_scale", None)

    @property
    def act_quant_enabled(self) -> bool:
        return 0 < self.abits < 16

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quant_enabled:
            return x
        if self.act_dynamic:
            return fake_quant_per_token(x, self.abits)
        if self.act_scale is None or self.calibrating:
            with torch.no_grad():
                self.observer.observe(x)
            scale = self.observer.scale(self.abits).to(x.device)
        else:
            scale = self.act_scale
        return fake_quant_sym(x, scale.to(x.dtype), self.abits)

    def freeze(self) -> None:
        if self.observer.running is not None and self.act_quant_enabled and not self.act_dynamic:
            self.act_scale = self.observer.scale(self.abits).to(self.weight_q.device, self.weight_q.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.weight_q, self.bias)

    def packed_bytes(self) -> int:
        """Bytes a packed format stores: int codes at `wbits` bits, fp16 scales, bias."""
        n = self.in_features * self.out_features
        total = (n * self.wbits + 7) // 8 + 2 * self.out_features if self.wbits < 16 else 2 * n
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total


def rtn_layer(linear: nn.Linear, name: str, wbits: int, config: RTNConfig) -> RTNLinear:
    """The RTN replacement of one selected linear."""
    base = config.base
    return RTNLinear(
        linear, name=name, wbits=wbits, abits=base.abits, act_pct=base.act_pct, act_dynamic=base.act_dynamic
    )
