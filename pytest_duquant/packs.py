"""A layer's offline DuQuant transforms and weight codes (a "pack"), and the content-keyed pack cache.

The cache key covers the layer name, the weight's bytes (shape and dtype included), every setting that
changes the pack, and the algorithm itself (PACK_FORMAT, the rotation's sign convention, the weight
quantizer's scale grid), so a pack computed for other weights, other settings or by another version of
the algorithm is never served. Packs are computed on the CPU in float64 whatever device the weight is on,
so CPU and CUDA runs (and float32/bfloat16/float64 copies of the same values) get the same pack. Writes are
atomic (temp file + os.replace), so a crash never leaves a half-written pack that a later run loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pytest_duquant.numerics import (
    BlockRotation,
    channel_energy,
    greedy_input_rotation,
    input_rotation,
    output_rotation,
    quantize_weight_mse,
    smooth_energy,
    zigzag_permutation,
)
from pytest_duquant.numerics.quantizers import MSE_GRID
from pytest_duquant.numerics.rotation import SIGN_CONVENTION

PACK_FORMAT = 2
"""2: rotation columns in canonical form (numerics.rotation.canonical_basis), packs computed on the CPU."""
log = logging.getLogger("duquant")


@dataclass
class LayerPack:
    perm: torch.Tensor | None  # [in] long
    r_in: BlockRotation  # input rotation over the permuted channels
    r_out: BlockRotation | None  # row rotation (None when ROW_ROT=0)
    weight_t: torch.Tensor | None  # transformed weight R_out (W P R_in), float64; kept only when unquantized
    codes: torch.Tensor | None  # integer codes [out, in] (None when wbits >= 16)
    scales: torch.Tensor | None  # [out] float32

    def dequantized(self) -> torch.Tensor:
        """The transformed weight as the quantized layer uses it (float64 if unquantized, else float32)."""
        if self.codes is None:
            return self.weight_t
        return self.codes.to(torch.float32) * self.scales[:, None]


def build_pack(weight: torch.Tensor, *, wbits: int, block: int, block_out: int, ls: float, permute: bool,
               row_rot: str, rotation: str = "svd") -> LayerPack:
    """docs/contract.md "Algorithm" steps 1-5 for one weight [out, in], computed on the CPU in float64.

    rotation: "svd" (the contract's default) or "greedy" (the paper's). The pack is on the CPU."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    perm = zigzag_permutation(smooth_energy(channel_energy(w), ls)) if permute else None
    wp = w[:, perm.to(w.device)] if perm is not None else w
    r_in = input_rotation(wp, block) if rotation == "svd" else greedy_input_rotation(wp, block)
    wt = r_in.apply(wp)
    r_out = None
    if row_rot != "0":
        # U of a row block of W P R_in equals U of the row block of W: R_in and P only rotate its columns.
        r_out = output_rotation(w, block_out)
        wt = r_out.apply_left(wt)
    weight_t = wt
    if wbits >= 16:
        codes = scales = None
    else:
        codes, scales = quantize_weight_mse(wt.to(torch.float32), wbits)
        weight_t = None
    return LayerPack(
        perm=perm,
        r_in=r_in,
        r_out=r_out,
        weight_t=weight_t,
        codes=codes,
        scales=scales,
    )


def weight_digest(weight: torch.Tensor) -> str:
    t = weight.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pack_key(name: str, weight: torch.Tensor, settings: dict) -> str:
    """Content key of a pack: algorithm version, layer name, weight bytes and `settings` (the config's
    pack_settings() plus the layer's wbits)."""
    algorithm = {"format": PACK_FORMAT, "signs": SIGN_CONVENTION, "mse_grid": list(MSE_GRID)}
    payload = json.dumps({"algorithm": algorithm, "name": name, "weight": weight_digest(weight), **settings},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class PackCache:
    """Folder of packs, one file per (layer, weight, settings) key."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def path_for(self, name: str, key: str) -> Path:
        return self.folder / f"{_sanitize(name)}.{key}.pt"

    def load(self, name: str, key: str) -> LayerPack | None:
        path = self.path_for(name, key)
        if not path.exists():
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.get("format") != PACK_FORMAT or data.get("key") != key:
                raise ValueError("format or key mismatch")
            return _unflatten(data)
        except Exception as exc:  # a damaged file is recomputed, never trusted
            log.warning("Pack %s is unreadable (%s); recomputing it", path, exc)
            return None

    def save(self, name: str, key: str, pack: LayerPack) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_for(name, key)
        data = _flatten(pack)
        data.update(format=PACK_FORMAT, key=key, name=name)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
            # No fsync (0.6 s over the 126 expert packs): the rename is atomic for other processes, and a
            # file that a power loss leaves short fails the format/key check on load and is recomputed.
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def _flatten(pack: LayerPack) -> dict:
    out = {"r_in": pack.r_in.blocks}
    if pack.weight_t is not None:
        out["weight_t"] = pack.weight_t
    if pack.r_in.tail is not None:
        out["r_in_tail"] = pack.r_in.tail
    if pack.perm is not None:
        out["perm"] = pack.perm
    if pack.r_out is not None:
        out["r_out"] = pack.r_out.blocks
        if pack.r_out.tail is not None:
            out["r_out_tail"] = pack.r_out.tail
    if pack.codes is not None:
        out["codes"] = pack.codes
        out["scales"] = pack.scales
    return out


def _unflatten(data: dict) -> LayerPack:
    r_out = BlockRotation(data["r_out"], data.get("r_out_tail")) if "r_out" in data else None
    return LayerPack(
        perm=data.get("perm"),
        r_in=BlockRotation(data["r_in"], data.get("r_in_tail")),
        r_out=r_out,
        weight_t=data.get("weight_t"),
        codes=data.get("codes"),
        scales=data.get("scales"),
    )
