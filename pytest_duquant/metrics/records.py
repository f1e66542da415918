"""What a model measurement is: output error, per-layer SQNR (DuQuant and plain RTN), bytes; and the small math.

`ModelMetrics` is the record the probes produce, the model goldens store and the reports draw.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from pytest_duquant.config import DuQuantConfig

SQNR_CAP_DB = 200.0
# Config fields that change the measured numbers (a golden is recorded for one combination of these).
NUMERIC_SETTINGS = (
    "scope",
    "include",
    "exclude",
    "layers",
    "include_action_head",
    "wbits_default",
    "wbits",
    "abits",
    "act_pct",
    "calib_steps",
    "block",
    "block_out",
    "ls",
    "permute",
    "row_rot",
    "act_dynamic",
    "rotation",
)


def numeric_settings(config: DuQuantConfig) -> dict:
    """The settings of `config` that change the numbers (JSON-ready; block_out resolved)."""
    out = {}
    for name in NUMERIC_SETTINGS:
        value = config.effective_block_out if name == "block_out" else getattr(config, name)
        if isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[name] = value
    return out


def golden_name(preset: str, settings: dict, preset_settings: dict) -> str:
    """File stem for a run with `settings` under `preset` (whose pure settings are `preset_settings`)."""
    diff = sorted(k for k in set(settings) | set(preset_settings) if settings.get(k) != preset_settings.get(k))
    if not diff:
        return preset
    if diff == ["rotation"]:
        return f"{preset}-{settings['rotation']}"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{preset}-custom-{digest}"



# ---- small math --------------------------------------------------------------------------------
def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||ref - test||^2) in float64, capped at SQNR_CAP_DB."""
    r = ref.detach().to(torch.float64)
    e = (r - test.detach().to(torch.float64)).pow(2).sum().item()
    s = r.pow(2).sum().item()
    if e <= 0.0:
        return SQNR_CAP_DB
    if s <= 0.0:
        return -SQNR_CAP_DB
    return float(min(SQNR_CAP_DB, 10.0 * math.log10(s / e)))


def layer_position(name: str) -> tuple[int | None, str]:
    """(layer index from '.layers.N.' / '.layer.N.', projection kind = last name component)."""
    m = re.search(r"\.layers?\.(\d+)\.", "." + name + ".")
    kind = name.rsplit(".", 1)[-1]
    return (int(m.group(1)) if m else None), kind


@dataclass
class OutputError:
    """Error of a quantized model's output vs the FP output (same inputs, same noise)."""

    rel_l2: float
    max_abs: float
    per_step_rel_l2: list[float] = field(default_factory=list)
    per_step_max_abs: list[float] = field(default_factory=list)

    @classmethod
    def between(cls, ref_states: Sequence[torch.Tensor], test_states: Sequence[torch.Tensor]) -> OutputError:
        """States: one tensor per step (the last is the final output)."""
        rel, mx = [], []
        for r, t in zip(ref_states, test_states, strict=True):
            r64, t64 = r.to(torch.float64), t.to(torch.float64)
            d = t64 - r64
            rel.append(float(d.norm() / r64.norm().clamp_min(1e-30)))
            mx.append(float(d.abs().max()))
        many = len(rel) > 1
        return cls(rel[-1], mx[-1], rel if many else [], mx if many else [])


@dataclass
class LayerError:
    name: str
    index: int | None
    kind: str
    shape: list[int]  # [out, in]
    wbits: int
    sqnr_db: float  # DuQuant layer vs FP layer, on the FP model's calibration inputs
    rtn_sqnr_db: float | None  # plain RTN (same bits, same activation scheme, no transforms)
    rows: int  # input rows the SQNR was measured on

    @property
    def gain_db(self) -> float | None:
        return None if self.rtn_sqnr_db is None else self.sqnr_db - self.rtn_sqnr_db


@dataclass
class ModelMetrics:
    model: str  # "pi05:dummy", "minilm-l6-v2"
    fingerprint: str
    preset: str
    settings: dict
    protocol: dict
    output: OutputError
    output_rtn: OutputError | None
    layers: list[LayerError]
    bytes_before: int
    bytes_after: int
    info: dict = field(default_factory=dict)

    @property
    def mean_sqnr_db(self) -> float:
        return float(sum(la.sqnr_db for la in self.layers) / max(1, len(self.layers)))

    @property
    def mean_rtn_sqnr_db(self) -> float | None:
        vals = [la.rtn_sqnr_db for la in self.layers if la.rtn_sqnr_db is not None]
        return float(sum(vals) / len(vals)) if vals else None

    def layer(self, name: str) -> LayerError:
        for la in self.layers:
            if la.name == name:
                return la
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_sqnr_db"] = self.mean_sqnr_db
        d["mean_rtn_sqnr_db"] = self.mean_rtn_sqnr_db
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelMetrics:
        return cls(
            model=d["model"],
            fingerprint=d["fingerprint"],
            preset=d["preset"],
            settings=d["settings"],
            protocol=d["protocol"],
            output=OutputError(**d["output"]),
            output_rtn=None if d.get("output_rtn") is None else OutputError(**d["output_rtn"]),
            layers=[LayerError(**la) for la in d["layers"]],
            bytes_before=d["bytes_before"],
            bytes_after=d["bytes_after"],
            info=dict(d.get("info") or {}),
        )

    def summary_row(self) -> dict:
        return {
            "preset": self.preset,
            "rotation": self.settings.get("rotation"),
            "rel_l2": self.output.rel_l2,
            "max_abs": self.output.max_abs,
            "rtn_rel_l2": None if self.output_rtn is None else self.output_rtn.rel_l2,
            "mean_sqnr_db": self.mean_sqnr_db,
            "mean_rtn_sqnr_db": self.mean_rtn_sqnr_db,
            "layers_better_than_rtn": sum(1 for la in self.layers if (la.gain_db or 0.0) > 0.0),
            "layers": len(self.layers),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }
