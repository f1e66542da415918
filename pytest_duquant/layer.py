"""DuQuantLinear: the reference (fake-quant) DuQuant layer, dispatching to GPU kernels when allowed.

y = x W^T + b becomes, with the offline pack (perm P, input rotation R_in, row rotation R_out, codes):
  x_t = Q_a(x P R_in);  y_t = x_t (R_out W P R_in)_q^T;  restore: y = y_t R_out + b;
  propagate: y = y_t + R_out b;  ROW_ROT=0: y = y_t + b.
The weight side is transformed and quantized once (in the pack); forward only touches activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pytest_duquant.numerics import BlockRotation, PercentileObserver, fake_quant_sym
from pytest_duquant.numerics.quantizers import fake_quant_per_token
from pytest_duquant.packs import LayerPack


class DuQuantLinear(nn.Module):
    """A quantized stand-in for nn.Linear. Build with `from_pack`; `quantize_model` does it for you."""

    quantized_linear = True  # selection sees it as an already-quantized linear

    def __init__(self, in_features: int, out_features: int, *, name: str, wbits: int, abits: int,
                 block: int, block_out: int, row_rot: str, act_pct: float, calib_steps: int,
                 act_dynamic: bool = False, backend: str = "reference"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.name = name
        self.wbits = wbits
        self.abits = abits
        self.block = block
        self.block_out = block_out
        self.row_rot = row_rot
        self.act_pct = act_pct
        self.calib_steps = calib_steps
        self.act_dynamic = act_dynamic
        self.backend = backend
        self.observer = PercentileObserver(act_pct)
        self.calibrating = False  # inside an explicit calibration: observe every call, freeze at the end
        self.kernel_cache: dict = {}  # packed forms for GPU kernels, built lazily by pytest_duquant.kernels
        self.kernel_group = None  # a kernels.grouping.SiblingGroup when siblings share one input (q/k/v, gate/up)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pack(cls, linear: nn.Linear, pack: LayerPack, *, name: str, wbits: int, abits: int, block: int,
                  block_out: int, row_rot: str, act_pct: float, calib_steps: int, act_dynamic: bool = False,
                  backend: str = "reference") -> DuQuantLinear:
        layer = cls(linear.in_features, linear.out_features, name=name, wbits=wbits, abits=abits, block=block,
                    block_out=block_out, row_rot=row_rot, act_pct=act_pct, calib_steps=calib_steps,
                    act_dynamic=act_dynamic, backend=backend)
        dtype, device = linear.weight.dtype, linear.weight.device
        layer.register_buffer("perm", None if pack.perm is None else pack.perm.to(device))
        layer.register_buffer("r_in", pack.r_in.blocks.to(device=device, dtype=dtype))
        layer.register_buffer("r_in_tail", None if pack.r_in.tail is None else pack.r_in.tail.to(device, dtype))
        r_out = pack.r_out
        layer.register_buffer("r_out", None if r_out is None else r_out.blocks.to(device=device, dtype=dtype))
        layer.register_buffer("r_out_tail", None if r_out is None or r_out.tail is None
                              else r_out.tail.to(device, dtype))
        layer.register_buffer("w_codes", None if pack.codes is None else pack.codes.to(device))
        layer.register_buffer("w_scales", None if pack.scales is None else pack.scales.to(device))
        # The one float copy forward uses: the transformed weight, dequantized, in the model's dtype.
        layer.register_buffer("weight_q", pack.dequantized().to(device=device, dtype=dtype))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        bias_rot = None
        if bias is not None and row_rot == "propagate" and r_out is not None:
            bias_rot = r_out.apply_left(bias.to(device="cpu", dtype=torch.float64)).to(device=device, dtype=dtype)
        layer.register_buffer("bias_rot", bias_rot)
        layer.register_buffer("act_scale", None)
        return layer

    # ---- transforms ---------------------------------------------------------------------------
    @property
    def input_rotation(self) -> BlockRotation:
        return BlockRotation(self.r_in, self.r_in_tail)

    @property
    def output_rotation(self) -> BlockRotation | None:
        return None if self.r_out is None else BlockRotation(self.r_out, self.r_out_tail)

    @property
    def act_quant_enabled(self) -> bool:
        return 0 < self.abits < 16

    @property
    def calibrated(self) -> bool:
        return self.act_scale is not None

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x P R_in (no quantization)."""
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return self.input_rotation.apply(x)

    def quantize_input(self, x_t: torch.Tensor) -> torch.Tensor:
        """Fake-quantize transformed activations: per-token dynamic, or static per-channel (calibrating)."""
        if not self.act_quant_enabled:
            return x_t
        if self.act_dynamic:
            return fake_quant_per_token(x_t, self.abits)
        return fake_quant_sym(x_t, self._static_scale(x_t).to(x_t.dtype), self.abits)

    def _static_scale(self, x_t: torch.Tensor) -> torch.Tensor:
        if self.act_scale is not None and not self.calibrating:
            return self.act_scale
        with torch.no_grad():
            self.observer.observe(x_t)
            scale = self.observer.scale(self.abits).to(x_t.device)
            if not self.calibrating and self.observer.calls >= self.calib_steps:
                self.freeze()
        return scale

    def freeze(self) -> None:
        """Fix the static activation scale from what was observed so far (no-op if nothing was)."""
        if self.observer.running is not None and self.act_quant_enabled and not self.act_dynamic:
            self.act_scale = self.observer.scale(self.abits).to(device=self.weight_q.device,
                                                                  dtype=self.weight_q.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A calibrated scale saved from another instance loads into this (not yet calibrated) one.
        key = prefix + "act_scale"
        if key in state_dict and self.act_scale is None:
            self.act_scale = state_dict[key].detach().clone().to(self.weight_q.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def restore_output(self, y_t: torch.Tensor) -> torch.Tensor:
        """Finish the layer from the rotated-basis product y_t = x_t W_t^T."""
        if self.row_rot == "restore" and self.r_out is not None:
            y_t = self.output_rotation.apply(y_t)
            return y_t if self.bias is None else y_t + self.bias
        if self.row_rot == "propagate" and self.bias_rot is not None:
            return y_t + self.bias_rot
        return y_t if self.bias is None else y_t + self.bias

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from pytest_duquant.kernels import ops

            if ops.wants_ops(x):  # torch.compile tracing a CUDA input (or ops.FORCE_OPS): the custom ops
                y = ops.layer_forward(self, x)
                if y is not None:
                    return y
        if self.backend == "triton" and x.is_cuda:
            from pytest_duquant.kernels.dispatch import can_use_triton, w4a8_forward

            if self.kernel_group is not None:
                y = self.kernel_group.forward(self, x)
                if y is not None:
                    return y
            ok, _reason = can_use_triton(self, x)
            if ok:
                return w4a8_forward(self, x)
        x_t = self.quantize_input(self.transform_input(x))
        return self.restore_output(F.linear(x_t, self.weight_q))

    def extra_repr(self) -> str:
        a = f"A{self.abits}" + ("dyn" if self.act_dynamic else "") if self.act_quant_enabled else "A16"
        return (f"{self.name}: in={self.in_features}, out={self.out_features}, W{self.wbits}{a}, "
                f"block={self.block}, block_out={self.block_out}, permute={self.perm is not None}, "
                f"row_rot={self.row_rot}, backend={self.backend}")

    # ---- accounting ---------------------------------------------------------------------------
    def packed_bytes(self) -> int:
        """Bytes a real packed format stores: int codes at `wbits` bits, fp16 scales, transforms, bias."""
        n = self.in_features * self.out_features
        total = (n * self.wbits + 7) // 8 + 2 * self.out_features if self.wbits < 16 else 2 * n
        total += 2 * self.r_in.numel() + (0 if self.r_in_tail is None else 2 * self.r_in_tail.numel())
        if self.r_out is not None and self.row_rot != "0":
            total += 2 * self.r_out.numel() + (0 if self.r_out_tail is None else 2 * self.r_out_tail.numel())
        if self.perm is not None:
            total += 2 * self.in_features  # int16 indices
        if self.bias is not None:
            total += self.bias.numel() * self.bias.element_size()
        return total


def group_siblings(model: torch.nn.Module) -> int:
    """Attach a SiblingGroup to every set of DuQuantLinear siblings (SIBLING_NAMES under one parent with the
    same in_features); returns how many groups were formed."""
    from pytest_duquant.kernels.grouping import SIBLING_NAMES, SiblingGroup, geglu_mlp_forward

    count = 0
    for parent in model.modules():
        for names in SIBLING_NAMES:
            layers = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, DuQuantLinear) for m in layers) and len({m.in_features for m in layers}) == 1:
                group = SiblingGroup(layers)
                for m in layers:
                    m.kernel_group = group
                count += 1
                if names == ("gate_proj", "up_proj") and isinstance(getattr(parent, "down_proj", None),
                                                                   DuQuantLinear):
                    # a GeGLU MLP whose forward honours `fused_forward` (modeling.GemmaMLP) may run it fused
                    parent.__dict__["fused_forward"] = geglu_mlp_forward
    return count
