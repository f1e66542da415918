"""Kernel-ready packed forms of one DuQuant linear (pure torch; no triton import).

`W4A8Pack`: the real integer path (dynamic per-token int8 activations x int4 weights).
`SimPack`:  the fast simulated path (static per-channel fake-quant activations x dequantized weights).

Math (docs/contract.md, "Algorithm"; row-vector convention, the same as `pytest_duquant.layer.DuQuantLinear`):
    x_t = x[:, perm] @ blockdiag(r_in)            (perm optional)
    real:      a, s_a = per-token int8 quant of x_t;  y_t = (a @ w_codesᵀ) * s_a[:, None] * w_scales[None, :]
    simulated: x_q = fake_quant(x_t, act_scale);      y_t = x_q @ weight_qᵀ
    restore:   y = y_t @ blockdiag(r_out) + bias;   propagate / 0: y = y_t + bias (bias already rotated)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pytest_duquant.kernels.packing import PACK_GROUP, pack_int4

CHUNK = 64  # activation columns produced per rotation step in the kernels


def tensor_version(t: torch.Tensor) -> int | None:
    """t._version, or None for an inference tensor (torch.inference_mode() tracks no versions: reading one
    raises "Inference tensors do not track version counter")."""
    return None if t.is_inference() else t._version


def rotation_supported(in_features: int, block: int) -> tuple[bool, str]:
    """The kernels rotate 64 output columns at a time: b must divide 64 (b >= 16) or be a multiple of 64."""
    if in_features % PACK_GROUP:
        return False, f"in_features={in_features} is not a multiple of {PACK_GROUP}"
    if in_features % block:
        return False, f"block={block} does not divide in_features={in_features} (tail block)"
    if not (CHUNK % block == 0 and block >= 16) and not (block % CHUNK == 0):
        return False, f"block={block}: the kernels need 16 <= block <= 64 dividing 64, or a multiple of 64"
    return True, ""


@dataclass
class W4A8Pack:
    in_features: int
    out_features: int
    block: int
    perm: torch.Tensor | None  # int32 [K]
    r_in: torch.Tensor  # [K // block, block, block], rot dtype (bf16 by default)
    w_packed: torch.Tensor  # uint8 [N, K // 2] (pack_int4 layout)
    w_scales: torch.Tensor  # float32 [N]
    bias: torch.Tensor | None  # float32 [N] (already rotated for propagate)
    r_out: (
        torch.Tensor | None
    )  # rot dtype (bf16 default) [N // block_out, block_out, block_out]; restore only
    block_out: int
    abits: int

    @property
    def qmax_a(self) -> int:
        return (1 << (self.abits - 1)) - 1

    def nbytes(self) -> int:
        total = 0
        for t in (self.perm, self.r_in, self.w_packed, self.w_scales, self.bias, self.r_out):
            if t is not None:
                total += t.numel() * t.element_size()
        return total


@dataclass
class SimPack:
    in_features: int
    out_features: int
    block: int
    perm: torch.Tensor | None  # int32 [K]
    r_in: torch.Tensor  # [nb, b, b] rot dtype
    act_scale: (
        torch.Tensor | None
    )  # float32 [K] static per-channel step (transformed basis); None = no act quant
    weight: torch.Tensor  # [N, K] compute dtype: dequantized weight with the restore rotation folded in
    bias: torch.Tensor | None  # [N] compute dtype
    abits: int

    @property
    def qmax_a(self) -> int:
        return (1 << (self.abits - 1)) - 1 if self.abits else 0


def _perm32(perm: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if perm is None else perm.to(device=device, dtype=torch.int32).contiguous()


def make_w4a8_pack(
    *, perm, r_in, w_codes, w_scales, bias=None, r_out=None, row_rot="0", abits=8, rot_dtype=torch.bfloat16,
    w_packed=None,
) -> W4A8Pack:
    """Build the packed form. `bias` must already be in the output basis the kernel adds it in
    (original basis for restore/0, rotated for propagate). `r_out` is used only when row_rot == "restore".
    `w_packed`: codes already packed by pack_int4 (used as is, no copy) instead of `w_codes`."""
    if w_packed is not None:
        n, k = w_packed.shape[0], 2 * w_packed.shape[1]
        w_codes = w_packed
    else:
        n, k = w_codes.shape
    nb, b, b2 = r_in.shape
    if b != b2 or nb * b != k:
        raise ValueError(f"r_in shape {tuple(r_in.shape)} does not match in_features={k}")
    ok, why = rotation_supported(k, b)
    if not ok:
        raise ValueError(f"make_w4a8_pack: {why}")
    if not 2 <= abits <= 8:
        raise ValueError(f"make_w4a8_pack: abits={abits}: the integer path needs 2..8 activation bits")
    dev = w_codes.device
    ro = None
    bo = 0
    if row_rot == "restore" and r_out is not None:
        nbo, bo, _ = r_out.shape
        if nbo * bo != n:
            raise ValueError(f"r_out shape {tuple(r_out.shape)} does not match out_features={n}")
        ro = r_out.to(device=dev, dtype=rot_dtype).contiguous()  # bf16 by default (memory: ~3.6x vs bf16 W)
    return W4A8Pack(
        in_features=k,
        out_features=n,
        block=b,
        perm=_perm32(perm, dev),
        r_in=r_in.to(device=dev, dtype=rot_dtype).contiguous(),
        w_packed=w_packed if w_packed is not None else pack_int4(w_codes),
        w_scales=w_scales.to(device=dev, dtype=torch.float32).contiguous(),
        bias=None if bias is None else bias.to(device=dev, dtype=torch.float32).contiguous(),
        r_out=ro,
        block_out=bo,
        abits=abits,
    )


SMALL_M = 64  # token count up to which the small-M (swap-AB) kernels and W4A8Groups run
GROUP_TILE = 64  # output rows per GEMM tile in the small-M kernels: every member's N must be a multiple


@dataclass
class W4A8Group:
    """Linears that read the same input (q/k/v, gate/up), packed side by side so that one activation launch
    computes every member's transform and one GEMM launch computes every member's output.

    Each member keeps its own permutation, rotations and scales (numerically the same as running the members
    one by one); the tensors are concatenated: perm [S*K], r_in [S*K/b, b, b], w_packed [N_total, K/2],
    w_scales/bias [N_total], r_out [N_total/bo, bo, bo]. `tile_member[j]` is the member of GEMM row tile j."""

    packs: tuple
    in_features: int
    block: int
    perm: torch.Tensor | None
    r_in: torch.Tensor
    w_packed: torch.Tensor
    w_scales: torch.Tensor
    bias: torch.Tensor | None
    r_out: torch.Tensor | None
    block_out: int
    abits: int
    widths: tuple  # out_features of each member
    tile_member: torch.Tensor  # int32 [N_total / GROUP_TILE]

    @property
    def size(self) -> int:
        return len(self.widths)

    @property
    def out_features(self) -> int:
        return sum(self.widths)

    @property
    def qmax_a(self) -> int:
        return (1 << (self.abits - 1)) - 1

    def nbytes(self) -> int:
        total = self.tile_member.numel() * 4
        for t in (self.perm, self.r_in, self.w_packed, self.w_scales, self.bias, self.r_out):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def split(self, y: torch.Tensor) -> tuple:
        """Column views of a [..., N_total] output, one per member."""
        return tuple(torch.split(y, list(self.widths), dim=-1))


def group_mismatch(packs) -> str:
    """Why `packs` cannot form one W4A8Group ('' when they can)."""
    if not packs:
        return "no members"
    first = packs[0]
    for p in packs:
        for attr in ("in_features", "block", "block_out", "abits"):
            if getattr(p, attr) != getattr(first, attr):
                return f"members differ in {attr} ({getattr(first, attr)} vs {getattr(p, attr)})"
        for attr in ("perm", "r_out", "bias"):
            if (getattr(p, attr) is None) != (getattr(first, attr) is None):
                return f"members differ in whether they have {attr}"
        if p.out_features % GROUP_TILE:
            return f"out_features={p.out_features} is not a multiple of {GROUP_TILE}"
        if p.r_in.dtype != first.r_in.dtype or p.w_packed.device != first.w_packed.device:
            return "members differ in rotation dtype or device"
    return ""


def make_w4a8_group(packs) -> W4A8Group:
    """Concatenate W4A8Packs that share one input (see W4A8Group); ValueError says why they cannot."""
    packs = tuple(packs)
    why = group_mismatch(packs)
    if why:
        raise ValueError(f"make_w4a8_group: {why}")
    first = packs[0]

    def cat(attr, dim=0):
        ts = [getattr(p, attr) for p in packs]
        if ts[0] is None:
            return None
        return ts[0] if len(ts) == 1 else torch.cat(ts, dim=dim).contiguous()

    widths = tuple(p.out_features for p in packs)
    member = torch.repeat_interleave(
        torch.arange(len(packs), dtype=torch.int32), torch.tensor([w // GROUP_TILE for w in widths])
    )
    group = W4A8Group(
        packs=packs,
        in_features=first.in_features,
        block=first.block,
        perm=cat("perm"),
        r_in=cat("r_in"),
        w_packed=cat("w_packed"),
        w_scales=cat("w_scales"),
        bias=cat("bias"),
        r_out=cat("r_out"),
        block_out=first.block_out,
        abits=first.abits,
        widths=widths,
        tile_member=member.to(first.w_packed.device),
    )
    # the members become views into the concatenated tensors: one copy of every weight
    k, b, bo = first.in_features, first.block, max(first.block_out, 1)
    members, row = [], 0
    for p, n in zip(packs, widths, strict=True):
        i = len(members)
        members.append(
            dataclasses.replace(
                p,
                perm=None if group.perm is None else group.perm[i * k : (i + 1) * k],
                r_in=group.r_in[i * (k // b) : (i + 1) * (k // b)],
                w_packed=group.w_packed[row : row + n],
                w_scales=group.w_scales[row : row + n],
                bias=None if group.bias is None else group.bias[row : row + n],
                r_out=None if group.r_out is None else group.r_out[row // bo : (row + n) // bo],
            )
        )
        row += n
    group.packs = tuple(members)
    return group


def fold_restore(weight_q: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """W_eff with x W_effᵀ = (x W_qᵀ) @ blockdiag(r_out): per row block j, W_eff[j] = R_jᵀ W_q[j]."""
    n, k = weight_q.shape
    nbo, bo, _ = r_out.shape
    w = weight_q.to(torch.float64).reshape(nbo, bo, k)
    return torch.einsum("nij,nik->njk", r_out.to(torch.float64), w).reshape(n, k)


def make_sim_pack(
    *,
    perm,
    r_in,
    weight_q,
    act_scale,
    bias=None,
    r_out=None,
    row_rot="0",
    abits=8,
    dtype=torch.bfloat16,
    rot_dtype=torch.bfloat16,
) -> SimPack:
    n, k = weight_q.shape
    nb, b, _ = r_in.shape
    ok, why = rotation_supported(k, b)
    if not ok:
        raise ValueError(f"make_sim_pack: {why}")
    dev = weight_q.device
    w = weight_q
    if row_rot == "restore" and r_out is not None:
        w = fold_restore(weight_q, r_out)
    quant = 0 < abits < 16 and act_scale is not None
    return SimPack(
        in_features=k,
        out_features=n,
        block=b,
        perm=_perm32(perm, dev),
        r_in=r_in.to(device=dev, dtype=rot_dtype).contiguous(),
        act_scale=act_scale.to(device=dev, dtype=torch.float32).contiguous() if quant else None,
        weight=w.to(device=dev, dtype=dtype).contiguous(),
        bias=None if bias is None else bias.to(device=dev, dtype=dtype).contiguous(),
        abits=abits if quant else 0,
    )
