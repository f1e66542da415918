"""The deployed form of a DuQuant layer, and what a model really holds in memory.

    n = deploy_model(model)        # every DuQuantLinear -> PackedDuQuantLinear, in place
    print(resident_bytes(model))   # bytes of parameters + buffers (+ kernel packs), by dtype and kind

`DuQuantLinear` (layer.py) keeps, beside its transforms, the dequantized weight in the model's dtype (what
forward multiplies with) and the int8 codes: per 4-bit weight 2 (bf16) + 1 bytes, or 4 + 1 in float32, six
to ten times the packed size. `PackedDuQuantLinear` keeps only what the numerics need:

  * the weight codes packed: two 4-bit codes per byte (wbits <= 4), int8 codes for 5..8 bits, int16 above;
    for in_features a multiple of 128 in the kernels' layout (kernels/packing.py), so the Triton W4A8 path
    uses the buffer itself; otherwise adjacent pairs (column 2i in the low nibble, 2i + 1 in the high one);
  * the per-row weight scales in float32 (a model-wide dtype cast such as ``model.to(torch.bfloat16)``
    moves them but never rounds them: the dequantization is defined in float32);
  * the transforms as the reference path uses them (permutation as int32, rotation blocks and tails in the
    model's dtype), the bias (rotated bias for ROW_ROT=propagate) and the activation state (the frozen
    static scale; the observer while calibration still runs).

Forward is the reference path of DuQuantLinear with the weight rebuilt per call, by the same operations
that built `weight_q` (codes -> float32, times the float32 scales, cast to the model's dtype): the same
values bit for bit, hence the same outputs bit for bit on the reference backend (tests/core/test_deploy.py).
The rebuilt weight lives only during the call (one layer at a time). A layer left unquantized by WBITS >= 16
keeps its float weight: there are no codes to pack.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from pytest_duquant.kernels.packing import PACK_GROUP, pack_int4, unpack_int4
from pytest_duquant.layer import DuQuantLinear, group_siblings

LAYOUTS = ("int4-k128", "int4-pairs", "int8", "int16", "float")


# ---- codes -------------------------------------------------------------------------------------------
def code_layout(wbits: int, in_features: int) -> str:
    """How a layer of `wbits` bits and `in_features` inputs stores its codes (one of LAYOUTS)."""
    if wbits >= 16:
        return "float"
    if wbits > 8:
        return "int16"
    if wbits > 4:
        return "int8"
    return "int4-k128" if in_features % PACK_GROUP == 0 else "int4-pairs"


def pack_codes(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """Integer codes [out, in] -> the stored form of `layout`."""
    if layout == "int4-k128":
        return pack_int4(codes)
    if layout == "int4-pairs":
        c = codes.to(torch.int16)
        if c.shape[1] % 2:
            c = torch.nn.functional.pad(c, (0, 1))
        c = c & 0xF
        return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8).contiguous()
    if layout == "int8":
        return codes.to(torch.int8).contiguous()
    if layout == "int16":
        return codes.to(torch.int16).contiguous()
    raise ValueError(f"pack_codes: layout {layout!r} holds no codes (one of {LAYOUTS[:-1]})")


def unpack_codes(packed: torch.Tensor, layout: str, in_features: int) -> torch.Tensor:
    """Inverse of `pack_codes`: int8 (int16 for layout int16) codes [out, in_features]."""
    if layout == "int4-k128":
        return unpack_int4(packed)
    if layout == "int4-pairs":
        p = packed.to(torch.int16)
        lo, hi = p & 0xF, (p >> 4) & 0xF
        lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
        return torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)[:, :in_features].to(torch.int8)
    if layout in ("int8", "int16"):
        return packed
    raise ValueError(f"unpack_codes: layout {layout!r} holds no codes")


def packed_shape(layout: str, out_features: int, in_features: int) -> tuple[int, int]:
    if layout == "int4-k128":
        return out_features, in_features // 2
    if layout == "int4-pairs":
        return out_features, (in_features + 1) // 2
    return out_features, in_features


PACKED_DTYPES = {"int4-k128": torch.uint8, "int4-pairs": torch.uint8, "int8": torch.int8, "int16": torch.int16}


# ---- the deployed layer ---------------------------------------------------------------------------------
_ATTRS = ("in_features", "out_features", "name", "wbits", "abits", "block", "block_out", "row_rot", "act_pct",
          "calib_steps", "act_dynamic", "backend")


class PackedDuQuantLinear(DuQuantLinear):
    """A DuQuantLinear holding packed codes instead of a float weight copy (module docstring).

    Build with `from_layer(quantized_layer)` or `deploy_model(model)`; `empty(...)` makes a shell whose
    buffers a state dict fills (quantized checkpoints)."""

    deployed = True

    def __init__(self, *args, code_layout: str = "int4-k128", **kwargs):
        super().__init__(*args, **kwargs)
        if code_layout not in LAYOUTS:
            raise ValueError(f"code_layout {code_layout!r}: one of {LAYOUTS}")
        self.code_layout = code_layout

    def settings(self) -> dict:
        """Everything besides the tensors that rebuilds this layer (quantized checkpoints store it)."""
        return {**{a: getattr(self, a) for a in _ATTRS}, "code_layout": self.code_layout}

    @classmethod
    def from_layer(cls, layer: DuQuantLinear) -> PackedDuQuantLinear:
        if isinstance(layer, PackedDuQuantLinear):
            return layer
        layout = code_layout(layer.wbits, layer.in_features)
        new = cls(**{a: getattr(layer, a) for a in _ATTRS if a not in ("in_features", "out_features")},
                  in_features=layer.in_features, out_features=layer.out_features, code_layout=layout)
        new.observer = layer.observer
        new.calibrating = layer.calibrating
        new.register_buffer("perm", None if layer.perm is None else layer.perm.to(torch.int32))
        for name in ("r_in", "r_in_tail", "r_out", "r_out_tail", "bias_rot", "act_scale"):
            new.register_buffer(name, getattr(layer, name))
        new.bias = layer.bias
        if layout == "float":
            new.register_buffer("weight_float", layer.weight_q)
            new.register_buffer("w_packed", None)
            new.register_buffer("w_scales", None)
        else:
            new.register_buffer("w_packed", pack_codes(layer.w_codes, layout))
            new.register_buffer("w_scales", layer.w_scales.to(torch.float32))
        return new

    @classmethod
    def empty(cls, settings: dict, *, tensors: dict[str, tuple], device="cpu") -> PackedDuQuantLinear:
        """A shell whose buffers (`tensors`: name -> (shape, dtype); absent names are None) a state dict fills."""
        layer = cls(**settings)
        for name in ("perm", "r_in", "r_in_tail", "r_out", "r_out_tail", "bias_rot", "act_scale", "w_packed",
                     "w_scales", "weight_float"):
            spec = tensors.get(name)
            layer.register_buffer(name, None if spec is None else torch.zeros(spec[0], dtype=spec[1], device=device))
        spec = tensors.get("bias")
        layer.bias = None if spec is None else nn.Parameter(torch.zeros(spec[0], dtype=spec[1], device=device),
                                                            requires_grad=False)
        if layer.r_in is None:
            raise ValueError("no r_in tensor")
        return layer

    # ---- the weight, rebuilt per call ---------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.r_in.dtype

    @property
    def w_codes(self) -> torch.Tensor | None:  # noqa: D401 - the codes, unpacked (a per-call temporary)
        if self.w_packed is None:
            return None
        return unpack_codes(self.w_packed, self.code_layout, self.in_features)

    @property
    def weight_q(self) -> torch.Tensor:
        """The transformed, dequantized weight in the model's dtype: the same operations (and so the same
        values) as DuQuantLinear.from_pack's `pack.dequantized().to(dtype)`."""
        if self.code_layout == "float":
            return self.weight_float
        return (self.w_codes.to(torch.float32) * self.w_scales[:, None]).to(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        scales = self._buffers.get("w_scales")
        super()._apply(fn, recurse)
        if scales is not None:  # move, never round: an integer view is not touched by dtype casts
            self._buffers["w_scales"] = fn(scales.view(torch.int32)).view(torch.float32)
        return self

    # ---- activation state ---------------------------------------------------------------------------
    def freeze(self) -> None:
        if self.observer.running is not None and self.act_quant_enabled and not self.act_dynamic:
            self.act_scale = self.observer.scale(self.abits).to(device=self.r_in.device, dtype=self.compute_dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "act_scale"
        if key in state_dict and self.act_scale is None:
            self.act_scale = state_dict[key].detach().clone().to(self.r_in.device)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", deployed ({self.code_layout})"


def deploy_model(model: nn.Module) -> int:
    """Replace every DuQuantLinear of `model` (in place) by its PackedDuQuantLinear; returns how many.

    Sibling groups (backend triton) are rebuilt over the new layers."""

    count, regroup = 0, False
    for name, module in list(model.named_modules()):
        if isinstance(module, DuQuantLinear) and not isinstance(module, PackedDuQuantLinear):
            packed = PackedDuQuantLinear.from_layer(module)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, packed)
            regroup = regroup or module.kernel_group is not None
            count += 1
    if regroup:
        group_siblings(model)
    return count


# ---- resident bytes -----------------------------------------------------------------------------------
_KINDS = {
    "weight_q": "float weight copy", "weight_float": "float weight (unquantized layer)",
    "w_codes": "int8 weight codes", "w_packed": "packed weight codes", "w_scales": "weight scales",
    "perm": "transforms", "r_in": "transforms", "r_in_tail": "transforms", "r_out": "transforms",
    "r_out_tail": "transforms", "bias_rot": "bias", "act_scale": "activation scales",
}


@dataclass
class ResidentBytes:
    """Bytes held by a module's parameters and buffers (each storage once), by dtype and by kind."""

    total: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"total": self.total, "by_dtype": dict(self.by_dtype), "by_kind": dict(self.by_kind)}

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(self.by_kind.items(), key=lambda kv: -kv[1]))
        dtypes = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in sorted(self.by_dtype.items(), key=lambda kv: -kv[1]))
        return f"{self.total / 2**20:.2f} MiB (by kind, MiB: {kinds}; by dtype, MiB: {dtypes})"


def _kernel_tensors(module: nn.Module):
    cache = getattr(module, "kernel_cache", None) or {}
    for entry in cache.values():
        pack = entry[1] if isinstance(entry, tuple) else entry
        for value in vars(pack).values() if hasattr(pack, "__dict__") else ():
            if isinstance(value, torch.Tensor):
                yield value


def resident_bytes(model: nn.Module) -> ResidentBytes:
    """What `model` holds: parameters, buffers and GPU kernel packs, each storage counted once (views and
    shared tensors are not counted twice; a view counts its whole storage, which is what stays allocated).

    Kinds: "parameters" and "buffers" for ordinary modules; a quantized layer's tensors by role (float
    weight copy, int8 weight codes, packed weight codes, weight scales, transforms, bias, activation scales);
    "kernel packs" for tensors only the GPU kernels' packed forms hold."""
    seen: set[tuple] = set()
    out = ResidentBytes()
    by_dtype: dict[str, int] = defaultdict(int)
    by_kind: dict[str, int] = defaultdict(int)

    def add(t: torch.Tensor, kind: str) -> None:
        if t is None or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        if key in seen or storage.nbytes() == 0:
            return
        seen.add(key)
        n = storage.nbytes()
        out.total += n
        by_dtype[str(t.dtype).removeprefix("torch.")] += n
        by_kind[kind] += n

    for module in model.modules():
        quantized = isinstance(module, DuQuantLinear) or hasattr(module, "calibrating")
        for name, p in module.named_parameters(recurse=False):
            add(p, "bias" if quantized and name == "bias" else "parameters")
        for name, b in module.named_buffers(recurse=False):
            add(b, _KINDS.get(name, "buffers") if quantized else "buffers")
    for module in model.modules():
        for t in _kernel_tensors(module):
            add(t, "kernel packs")
    out.by_dtype, out.by_kind = dict(by_dtype), dict(by_kind)
    return out


def cuda_allocated() -> int | None:
    """torch.cuda.memory_allocated() after a synchronize, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())
