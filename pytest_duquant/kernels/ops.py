# ruff: noqa: UP045  (the custom ops' annotations stay Optional[...]: torch.library infers their schemas from them)
"""The W4A8 kernels as `torch.library` custom ops: a quantized linear torch.compile can trace without a graph break.

    duquant::w4a8_linear(x, perm?, r_in, w_packed, w_scales, bias?, r_out?, abits) -> y         (W4A8Pack)
    duquant::simulated_linear(x, perm?, r_in, act_scale?, weight, bias?, abits) -> y          (SimPack)
    duquant::w4a8_group(x, perm?, r_in, w_packed, w_scales, bias?, r_out?, tile_member, abits, widths) -> y
                                                                  (W4A8Group: members side by side, [..., sum(widths)])

Each op takes a pack's tensors and scalars and returns a new tensor [..., N] in x.dtype. CUDA: the pack is rebuilt
from the arguments (views, no copy) and the Triton launcher runs (`triton_kernels`, imported on the first CUDA
call). Any other device: the torch twin from `reference.py` (float64), cast to x.dtype as the kernel's output
is. The fake (meta) implementations give dynamo/AOTAutograd the output's shape and dtype, so the compiled graph
holds one opaque node per op and inductor fuses the elementwise work around it.

Model side (`DuQuantLinear.forward`, backend "triton"): while torch.compile traces a CUDA input, or always when
`FORCE_OPS` is set (tests, any device), the layer runs its op from the pack an eager call already built
(`layer.kernel_cache["triton"]`); tracing never calls `get_pack` or the sibling group's bookkeeping (data
pointers, versions). `prepare_for_compile(model, dtype)` builds every pack beforehand (Pi05Model.compile_fast_step
calls it). Under compile, packs are not re-validated: change weights or scales, then prepare and compile again.

Sibling groups: a member called alone runs its own `w4a8_linear` op (its pack is a view into the group's). A
caller that has all members and their shared input (`sibling_outputs`: pi0.5's q/k/v and gate/up) gets one
`w4a8_group` op for all of them, split afterwards, on the same conditions as the eager group (every member on the
integer path, at most `grouping.GROUP_MAX_M` tokens). The ops have no backward: an input that needs a gradient
takes the layer's other paths.
"""

from typing import Optional

import torch

from pytest_duquant.kernels.packs import SimPack, W4A8Group, W4A8Pack

# tests: route every triton-backend DuQuantLinear through the ops, eager or compiled, on any device (CPU runs the
# reference implementations). Off: only inputs on CUDA traced by torch.compile take the ops.
FORCE_OPS = False


# ---- rebuilding the packs from op arguments ---------------------------------------------------------------
def w4a8_pack_from_args(perm, r_in, w_packed, w_scales, bias, r_out, abits: int) -> W4A8Pack:
    return W4A8Pack(
        in_features=2 * w_packed.shape[1],
        out_features=w_packed.shape[0],
        block=r_in.shape[-1],
        perm=perm,
        r_in=r_in,
        w_packed=w_packed,
        w_scales=w_scales,
        bias=bias,
        r_out=r_out,
        block_out=0 if r_out is None else r_out.shape[-1],
        abits=abits,
    )


def sim_pack_from_args(perm, r_in, act_scale, weight, bias, abits: int) -> SimPack:
    return SimPack(
        in_features=weight.shape[1],
        out_features=weight.shape[0],
        block=r_in.shape[-1],
        perm=perm,
        r_in=r_in,
        act_scale=act_scale,
        weight=weight,
        bias=bias,
        abits=abits,
    )


def group_from_args(perm, r_in, w_packed, w_scales, bias, r_out, tile_member, abits: int, widths) -> W4A8Group:
    """The W4A8Group of the arguments, its members views into the concatenated tensors (as make_w4a8_group)."""
    widths = tuple(int(w) for w in widths)
    k = 2 * w_packed.shape[1]
    b = r_in.shape[-1]
    bo = 0 if r_out is None else r_out.shape[-1]
    members, row = [], 0
    for i, n in enumerate(widths):
        members.append(
            w4a8_pack_from_args(
                None if perm is None else perm[i * k : (i + 1) * k],
                r_in[i * (k // b) : (i + 1) * (k // b)],
                w_packed[row : row + n],
                w_scales[row : row + n],
                None if bias is None else bias[row : row + n],
                None if r_out is None else r_out[row // bo : (row + n) // bo],
                abits,
            )
        )
        row += n
    return W4A8Group(
        packs=tuple(members),
        in_features=k,
        block=b,
        perm=perm,
        r_in=r_in,
        w_packed=w_packed,
        w_scales=w_scales,
        bias=bias,
        r_out=r_out,
        block_out=bo,
        abits=abits,
        widths=widths,
        tile_member=tile_member,
    )


def _out_like(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n))


# ---- duquant::w4a8_linear ---------------------------------------------------------------------------------
@torch.library.custom_op("duquant::w4a8_linear", mutates_args=())
def w4a8_linear(
    x: torch.Tensor,
    perm: Optional[torch.Tensor],
    r_in: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    r_out: Optional[torch.Tensor],
    abits: int,
) -> torch.Tensor:
    """Real W4A8 linear (dynamic per-token int activations x int4 weights); non-CUDA: `w4a8_linear_ref`."""
    from pytest_duquant.kernels.reference import w4a8_linear_ref

    return w4a8_linear_ref(x, w4a8_pack_from_args(perm, r_in, w_packed, w_scales, bias, r_out, abits)).to(x.dtype)


@w4a8_linear.register_kernel("cuda")
def _w4a8_linear_cuda(x, perm, r_in, w_packed, w_scales, bias, r_out, abits):
    from pytest_duquant.kernels import triton_kernels as tk

    return tk.w4a8_linear(x, w4a8_pack_from_args(perm, r_in, w_packed, w_scales, bias, r_out, abits))


@w4a8_linear.register_fake
def _w4a8_linear_fake(x, perm, r_in, w_packed, w_scales, bias, r_out, abits):
    torch._check(x.shape[-1] == 2 * w_packed.shape[1], lambda: "duquant::w4a8_linear: input width != in_features")
    return _out_like(x, w_packed.shape[0])


# ---- duquant::simulated_linear ----------------------------------------------------------------------------
@torch.library.custom_op("duquant::simulated_linear", mutates_args=())
def simulated_linear(
    x: torch.Tensor,
    perm: Optional[torch.Tensor],
    r_in: torch.Tensor,
    act_scale: Optional[torch.Tensor],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    abits: int,
) -> torch.Tensor:
    """Simulated linear (static per-channel fake-quant activations); non-CUDA: `simulated_linear_ref`."""
    from pytest_duquant.kernels.reference import simulated_linear_ref

    return simulated_linear_ref(x, sim_pack_from_args(perm, r_in, act_scale, weight, bias, abits)).to(x.dtype)


@simulated_linear.register_kernel("cuda")
def _simulated_linear_cuda(x, perm, r_in, act_scale, weight, bias, abits):
    from pytest_duquant.kernels import triton_kernels as tk

    y = tk.simulated_linear(x, sim_pack_from_args(perm, r_in, act_scale, weight, bias, abits))
    return y.clone() if y.data_ptr() == x.data_ptr() else y  # never (a GEMM output), but an op must not alias


@simulated_linear.register_fake
def _simulated_linear_fake(x, perm, r_in, act_scale, weight, bias, abits):
    torch._check(x.shape[-1] == weight.shape[1], lambda: "duquant::simulated_linear: input width != in_features")
    return _out_like(x, weight.shape[0])


# ---- duquant::w4a8_group ----------------------------------------------------------------------------------
@torch.library.custom_op("duquant::w4a8_group", mutates_args=())
def w4a8_group(
    x: torch.Tensor,
    perm: Optional[torch.Tensor],
    r_in: torch.Tensor,
    w_packed: torch.Tensor,
    w_scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    r_out: Optional[torch.Tensor],
    tile_member: torch.Tensor,
    abits: int,
    widths: list[int],
) -> torch.Tensor:
    """Every member of a W4A8Group on x, side by side [..., sum(widths)]; non-CUDA: `w4a8_group_ref`."""
    from pytest_duquant.kernels.reference import w4a8_group_ref

    group = group_from_args(perm, r_in, w_packed, w_scales, bias, r_out, tile_member, abits, widths)
    return w4a8_group_ref(x, group).to(x.dtype)


@w4a8_group.register_kernel("cuda")
def _w4a8_group_cuda(x, perm, r_in, w_packed, w_scales, bias, r_out, tile_member, abits, widths):
    from pytest_duquant.kernels import triton_kernels as tk

    group = group_from_args(perm, r_in, w_packed, w_scales, bias, r_out, tile_member, abits, widths)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return tk.w4a8_small(x2, group).reshape(*x.shape[:-1], group.out_features)


@w4a8_group.register_fake
def _w4a8_group_fake(x, perm, r_in, w_packed, w_scales, bias, r_out, tile_member, abits, widths):
    torch._check(x.shape[-1] == 2 * w_packed.shape[1], lambda: "duquant::w4a8_group: input width != in_features")
    return _out_like(x, sum(widths))


# ---- calling the ops on packs -------------------------------------------------------------------------------
def call_pack(x: torch.Tensor, pack) -> torch.Tensor:
    """The op of `pack` (W4A8Pack, SimPack or W4A8Group) on x."""
    if isinstance(pack, W4A8Group):
        return torch.ops.duquant.w4a8_group(
            x, pack.perm, pack.r_in, pack.w_packed, pack.w_scales, pack.bias, pack.r_out, pack.tile_member,
            pack.abits, list(pack.widths),
        )
    if isinstance(pack, W4A8Pack):
        return torch.ops.duquant.w4a8_linear(
            x, pack.perm, pack.r_in, pack.w_packed, pack.w_scales, pack.bias, pack.r_out, pack.abits
        )
    return torch.ops.duquant.simulated_linear(x, pack.perm, pack.r_in, pack.act_scale, pack.weight, pack.bias,
                                              pack.abits)


def wants_ops(x: torch.Tensor) -> bool:
    """Whether a triton-backend layer takes the op path for x: torch.compile tracing a CUDA input, or FORCE_OPS."""
    return FORCE_OPS or (x.is_cuda and torch.compiler.is_compiling())


def _no_grad_needed(x: torch.Tensor) -> bool:
    return not (x.requires_grad and torch.is_grad_enabled())


def _eligible(layer, x: torch.Tensor) -> bool:
    from pytest_duquant.kernels.dispatch import can_use_triton, layer_supported

    return (can_use_triton if x.is_cuda else layer_supported)(layer, x)[0]


def layer_pack(layer, x: torch.Tensor):
    """The pack `layer` runs x with on the op path, or None (the layer's other paths then run).

    Compiling: only the pack already in layer.kernel_cache (built by an eager call or `prepare_for_compile`), when
    it was built for this path, dtype (the simulated pack's weight is in the input dtype) and device; nothing
    here reads data pointers or versions. Eager: the same checks as the kernels' dispatch, then `get_pack`."""
    from pytest_duquant.kernels.dispatch import get_pack, uses_integer_path

    if torch.compiler.is_compiling():
        hit = layer.kernel_cache.get("triton")
        if hit is None or getattr(layer, "calibrating", False):
            return None
        key, pack = hit
        integer = uses_integer_path(layer)
        if key[0] != integer or (not integer and key[1] != x.dtype) or pack.r_in.device != x.device:
            return None
        return pack
    if not _eligible(layer, x):
        return None
    return get_pack(layer, x.dtype)


def layer_forward(layer, x: torch.Tensor):
    """`layer`'s output on x through its op, or None when the op path does not apply."""
    if not _no_grad_needed(x):
        return None
    pack = layer_pack(layer, x)
    return None if pack is None else call_pack(x, pack)


def group_pack(group, x: torch.Tensor):
    """The W4A8Group of a SiblingGroup for x on the op path, or None (same conditions as `SiblingGroup.forward`;
    compiling: only a group pack already built)."""
    from pytest_duquant.kernels import grouping
    from pytest_duquant.kernels.dispatch import uses_integer_path

    if x.shape[:-1].numel() > grouping.GROUP_MAX_M or not _no_grad_needed(x):
        return None
    if torch.compiler.is_compiling():
        built = group._pack
        if built is None or built[1] is None or built[1].r_in.device != x.device:
            return None
        if not all(uses_integer_path(m) and not getattr(m, "calibrating", False) for m in group.layers):
            return None
        return built[1]
    if not all(uses_integer_path(m) and _eligible(m, x) for m in group.layers):
        return None
    return group._group_pack(x.dtype)


def sibling_outputs(layers, x: torch.Tensor) -> tuple:
    """(layer(x) for layer in layers), with one `w4a8_group` op for all of them when they are one sibling group
    (in order) on the op path; otherwise each layer is called as usual (the eager group then serves them)."""
    layers = tuple(layers)
    first = layers[0]
    group = getattr(first, "kernel_group", None)
    if (
        group is not None
        and getattr(first, "backend", None) == "triton"
        and len(group.layers) == len(layers)
        and all(a is b for a, b in zip(group.layers, layers, strict=True))
        and wants_ops(x)
    ):
        grp = group_pack(group, x)
        if grp is not None:
            return tuple(grp.split(call_pack(x, grp)))
    return tuple(m(x) for m in layers)


def prepare_for_compile(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, *, force: bool = False) -> int:
    """Build, eagerly, the pack of every triton-backend DuQuantLinear of `model` that the kernels take for inputs
    of `dtype` on its device (CUDA; any device with `force` or FORCE_OPS), and every sibling group's W4A8Group, so
    that compiled code finds them (`layer_pack`, `group_pack`). Returns how many layers have a pack."""
    from pytest_duquant.kernels.dispatch import get_pack, uses_integer_path

    count = 0
    groups = {}
    with torch.no_grad():
        for m in model.modules():
            # a DuQuantLinear (duck-typed: pytest_duquant.layer imports this module, not the other way round)
            if not getattr(m, "quantized_linear", False) or getattr(m, "backend", None) != "triton":
                continue
            if not isinstance(getattr(m, "kernel_cache", None), dict):
                continue
            probe = torch.empty((0, m.in_features), dtype=dtype, device=m.r_in.device)
            if not (probe.is_cuda or force or FORCE_OPS) or not _eligible(m, probe):
                continue
            get_pack(m, dtype)
            count += 1
            if m.kernel_group is not None:
                groups[id(m.kernel_group)] = (m.kernel_group, probe)
        for group, probe in groups.values():
            if all(uses_integer_path(m) and _eligible(m, probe) for m in group.layers):
                group._group_pack(dtype)
    return count
