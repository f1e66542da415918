"""Sibling linears that read the same input (q/k/v of an attention block, gate/up of a GeGLU MLP) run as one
W4A8Group on the GPU: one activation launch and one GEMM launch for all of them instead of two per layer.

    n = quantize.group_siblings(model)   # quantize_model calls it when the backend is "triton"

Each DuQuantLinear keeps its own transforms and numerics; only the launches are shared. When any member is
called with an input x (few tokens, every member on the integer W4A8 path), all members' outputs are
computed at once and the others are held until they are called with the same tensor x (same object, data
pointer, shape and version; under torch.inference_mode() x has no version counter, so the version is left
out, and the held outputs are dropped once every member took its own or another input arrives). Anything
else (CPU, many tokens, a member on another path, a different input) runs the layer alone. No triton import
here: the kernels are imported only on the first CUDA call.
"""

from __future__ import annotations

import torch

from pytest_duquant.kernels.packs import tensor_version

SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# most tokens a group serves (more run each member alone): 256, above the swap-AB kernels' SMALL_M. Measured on
# an H200 (scripts/gpu_speed_job.py, docs/speed.md): the expert at batch 8 (80 tokens) is 6-8 % faster with its
# groups than with each member alone; the kernels are correct there (tests/kernels: 80-256 tokens).
GROUP_MAX_M = 256


# the GeGLU prologue on the model path (`geglu_mlp_forward`): down's activation kernel computes gelu(gate) * up
# itself (one launch and one bf16 round trip fewer); measured on an H200 with GROUP_MAX_M = 256: batch 8 -8 %
# (B) / -9 % (A), batch 1 -1 %; within a quarter of W4A8's own error of the unfused MLP (tests/kernels)
GEGLU_PROLOGUE = True


def geglu_mlp_forward(mlp, x: torch.Tensor):
    """``down(gelu_tanh(gate(x)) * up(x))`` of a quantized Gemma MLP in two kernel pairs: gate and up as one
    W4A8Group (its output is [gate | up] side by side), then the down projection with the GeGLU computed inside
    its activation kernel (`w4a8_small(..., geglu=True)`): no separate GeLU, product and activation launches,
    and the [M, mlp_dim] product never goes to memory. The GeGLU runs in float32 in the kernel (the eager path
    rounds gate, up and their product to the compute dtype): rounding differences only. Returns None when it
    does not apply (GEGLU_PROLOGUE off, CPU, too many tokens, a member off the integer W4A8 path, a rotated
    output basis); the caller then runs the layers as usual."""
    if not GEGLU_PROLOGUE or not x.is_cuda or torch.compiler.is_compiling():
        return None  # compiled: gate/up run as one `w4a8_group` op, then down (kernels.ops.sibling_outputs)
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    group = getattr(gate, "kernel_group", None)
    if group is None or group.layers != (gate, up) or x.shape[:-1].numel() > GROUP_MAX_M:
        return None
    from pytest_duquant.kernels.dispatch import can_use_triton, get_pack, uses_integer_path

    probe = x.new_empty((0, getattr(down, "in_features", 0)))
    layers_ok = all(uses_integer_path(m) and can_use_triton(m, x)[0] for m in (gate, up))
    if not (layers_ok and uses_integer_path(down) and can_use_triton(down, probe)[0]):
        return None
    if any(m.row_rot == "propagate" for m in (gate, up)):  # their outputs stay rotated: no GeLU on them
        return None
    grp = group._group_pack(x.dtype)
    if grp is None:
        return None
    from pytest_duquant.kernels import triton_kernels as tk

    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    gu = tk.w4a8_small(x2, grp)
    y = tk.w4a8_small(gu, get_pack(down, x.dtype), geglu=True)
    return y.reshape(*lead, y.shape[-1])


class HeldOutputs:
    """Outputs computed for every member on one input, handed out once each while that input is unchanged."""

    def __init__(self):
        self._input = None
        self._key = None
        self._pending: dict = {}

    @staticmethod
    def _key_of(x: torch.Tensor) -> tuple:
        return (x.data_ptr(), tuple(x.shape), x.dtype, tensor_version(x))

    def hold(self, x: torch.Tensor, outputs: dict) -> None:
        self._input, self._key, self._pending = x, self._key_of(x), dict(outputs)

    def take(self, layer, x: torch.Tensor):
        """The held output of `layer` for x, or None (another input, a changed input, or already taken)."""
        if x is not self._input or layer not in self._pending or self._key_of(x) != self._key:
            self._pending.clear()
            return None
        out = self._pending.pop(layer)
        if not self._pending:
            self._input = None
        return out


class SiblingGroup:
    def __init__(self, layers):
        self.layers = tuple(layers)
        self._held = HeldOutputs()
        self._pack = None  # (key, W4A8Group)

    def __repr__(self) -> str:
        return f"SiblingGroup({', '.join(layer.name for layer in self.layers)})"

    def _group_pack(self, x_dtype):
        """The members' W4A8Group (built once per weights/dtype; members become views into it), or None when
        the members cannot form one (group_mismatch)."""
        from pytest_duquant.kernels.dispatch import get_pack, kernel_pack_key
        from pytest_duquant.kernels.packs import group_mismatch, make_w4a8_group

        key = tuple(kernel_pack_key(layer, x_dtype) for layer in self.layers)
        if self._pack is None or self._pack[0] != key:
            packs = [get_pack(layer, x_dtype) for layer in self.layers]
            group = None if group_mismatch(packs) else make_w4a8_group(packs)
            if group is not None:
                for layer, member in zip(self.layers, group.packs, strict=True):
                    if getattr(layer, "deployed", False):  # one copy of the codes: the buffers become views
                        layer.w_packed = member.w_packed
                        layer.w_scales = member.w_scales
                    layer.kernel_cache["triton"] = (kernel_pack_key(layer, x_dtype), member)
                key = tuple(kernel_pack_key(layer, x_dtype) for layer in self.layers)
            self._pack = (key, group)
        return self._pack[1]

    def forward(self, layer, x: torch.Tensor):
        """The output of `layer` on x through the group, or None when the group does not apply."""
        held = self._held.take(layer, x)
        if held is not None:
            return held
        from pytest_duquant.kernels.dispatch import can_use_triton, uses_integer_path

        lead = x.shape[:-1]
        if lead.numel() > GROUP_MAX_M or not all(
            uses_integer_path(m) and can_use_triton(m, x)[0] for m in self.layers
        ):
            return None
        group = self._group_pack(x.dtype)
        if group is None:
            return None
        from pytest_duquant.kernels import triton_kernels as tk

        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        parts = [p.reshape(*lead, p.shape[-1]) for p in group.split(tk.w4a8_small(x2, group))]
        self._held.hold(x, {m: p for m, p in zip(self.layers, parts, strict=True) if m is not layer})
        return parts[self.layers.index(layer)]
