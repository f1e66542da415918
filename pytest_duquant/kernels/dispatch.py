"""Dispatch from `DuQuantLinear.forward` to the Triton kernels (backend "triton", OPENPI_DUQUANT_TRITON=1).

    ok, reason = can_use_triton(layer, x)   # never raises, never imports triton unless CUDA is there
    y = w4a8_forward(layer, x)              # only after ok

Which kernel runs:
  * act_dynamic and wbits <= 4 and 2 <= abits <= 8: the real W4A8 integer path (`w4a8_linear`).
  * otherwise (static per-channel activation scales, the existing integration's behaviour, or any wbits):
    the fast simulated path (`simulated_linear`), once the static scale is frozen (calibration runs on
    the reference path).
The packed forms are built once per layer and kept in `layer.kernel_cache`.
"""

from __future__ import annotations

import functools

import torch

from pytest_duquant.kernels.packs import make_sim_pack, make_w4a8_pack, rotation_supported, tensor_version


@functools.lru_cache(maxsize=1)
def triton_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"triton cannot be imported: {exc}"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU compute capability {major}.x < 8.0 (int8 tensor cores)"
    return True, ""


def uses_integer_path(layer) -> bool:
    return bool(getattr(layer, "act_dynamic", False)) and layer.wbits <= 4 and 2 <= layer.abits <= 8


def can_use_triton(layer, x: torch.Tensor) -> tuple[bool, str]:
    """Whether `w4a8_forward(layer, x)` can run, and if not, why (for the DEBUG log)."""
    if not x.is_cuda:
        return False, "input is not on a CUDA device"
    ok, why = triton_available()
    if not ok:
        return False, why
    return layer_supported(layer, x)


def layer_supported(layer, x: torch.Tensor) -> tuple[bool, str]:
    """`can_use_triton` without the device checks: whether the kernels (or their custom ops, `kernels.ops`) handle
    this layer and input at all (the ops' CPU implementations run on any device)."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False, f"input dtype {x.dtype} is not bf16/fp16/fp32"
    if x.shape[-1] != layer.in_features:
        return False, f"input width {x.shape[-1]} != in_features {layer.in_features}"
    if getattr(layer, "r_in_tail", None) is not None or getattr(layer, "r_out_tail", None) is not None:
        return False, "a rotation has a tail block (block does not divide the width)"
    ok, why = rotation_supported(layer.in_features, int(layer.r_in.shape[-1]))
    if not ok:
        return False, why
    deployed = getattr(layer, "deployed", False)
    if uses_integer_path(layer):
        if deployed:
            if layer.code_layout != "int4-k128":
                return False, f"deployed codes in layout {layer.code_layout}, not the kernels' int4 layout"
            return True, "w4a8 integer path"
        if getattr(layer, "w_codes", None) is None:
            return False, "layer has no integer weight codes"
        return True, "w4a8 integer path"
    if deployed:
        return False, "a deployed layer keeps no float weight: static activations run the reference path"
    if getattr(layer, "weight_q", None) is None:
        return False, "layer has no dequantized weight"
    act_quant = 0 < layer.abits < 16
    if act_quant and not layer.act_dynamic:
        if layer.act_scale is None or getattr(layer, "calibrating", False):
            return False, "static activation scale not frozen yet (calibration runs on the reference path)"
    if act_quant and layer.act_dynamic:
        return (
            False,
            f"dynamic activations with W{layer.wbits}A{layer.abits} have no kernel (needs W<=4, A<=8)",
        )
    return True, "simulated path"


def _bias_for_kernel(layer):
    if layer.row_rot == "propagate" and getattr(layer, "bias_rot", None) is not None:
        return layer.bias_rot
    return layer.bias


def kernel_pack_key(layer, x_dtype):
    """What a layer's packed form depends on (path, dtype, weights and scales by identity + version, row_rot)."""
    if getattr(layer, "deployed", False):  # packed codes are the stored weight (deploy.py)
        t = layer.w_packed
    else:
        t = layer.w_codes if uses_integer_path(layer) else layer.weight_q
    scale = getattr(layer, "act_scale", None)
    # versions are None for inference tensors (a model quantized or calibrated under inference_mode)
    return (
        uses_integer_path(layer),
        x_dtype,
        t.data_ptr(),
        tensor_version(t),
        None if scale is None else (scale.data_ptr(), tensor_version(scale)),
        layer.row_rot,
    )


def get_pack(layer, x_dtype=torch.bfloat16):
    """The kernel-ready pack of `layer` (built once, cached in layer.kernel_cache)."""
    cache = layer.kernel_cache
    key = kernel_pack_key(layer, x_dtype)
    hit = cache.get("triton")
    if hit is not None and hit[0] == key:
        return hit[1]
    bias = _bias_for_kernel(layer)
    if uses_integer_path(layer):
        deployed = getattr(layer, "deployed", False)
        pack = make_w4a8_pack(
            perm=layer.perm,
            r_in=layer.r_in,
            w_codes=None if deployed else layer.w_codes,
            w_packed=layer.w_packed if deployed else None,
            w_scales=layer.w_scales,
            bias=None if bias is None else bias.detach(),
            r_out=layer.r_out,
            row_rot=layer.row_rot,
            abits=layer.abits,
        )
    else:
        pack = make_sim_pack(
            perm=layer.perm,
            r_in=layer.r_in,
            weight_q=layer.weight_q,
            act_scale=layer.act_scale,
            bias=None if bias is None else bias.detach(),
            r_out=layer.r_out,
            row_rot=layer.row_rot,
            abits=layer.abits,
            dtype=x_dtype if x_dtype != torch.float32 else layer.weight_q.dtype,
        )
    cache["triton"] = (key, pack)
    return pack


def w4a8_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Forward of `layer` through the Triton kernels (call only when can_use_triton says yes)."""
    from pytest_duquant.kernels import triton_kernels as tk

    pack = get_pack(layer, x.dtype)
    if uses_integer_path(layer):
        return tk.w4a8_linear(x, pack)
    return tk.simulated_linear(x, pack)
