"""DuQuantConfig: what to quantize and how, built from presets, OPENPI_DUQUANT_* variables and overrides.

Precedence, highest first (docs/contract.md, "Configuration"): explicit override > environment variable >
preset > internal defaults (= preset A). Everything is validated here, before any weight is touched.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "OPENPI_DUQUANT_"

DEFAULT_SCOPE = "paligemma_with_expert.gemma_expert.model."
DEFAULT_INCLUDE = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj).*"
DEFAULT_EXCLUDE = r"(?:^|\.)(norm|ln|layernorm|emb)(?:\.|$)"
ROW_ROT_MODES = ("0", "restore", "propagate")
ROW_ROT_OFF_ALIASES = ("none", "off", "false", "no")
ROTATIONS = ("svd", "greedy")
BACKENDS = ("reference", "triton")


class DuQuantConfigError(ValueError):
    """A configuration value is invalid. The message names the variable, the value and what is allowed."""


class DuQuantConfigWarning(UserWarning):
    """A configuration value is suspicious (unknown variable, deprecated spelling) but usable."""


@dataclass(frozen=True)
class DuQuantConfig:
    """Settings of one DuQuant run. Field names follow the OPENPI_DUQUANT_* variables (lower case)."""

    preset: str = "A"
    enabled: bool = True
    debug: bool = False
    scope: str = DEFAULT_SCOPE
    include: str = DEFAULT_INCLUDE
    exclude: str = DEFAULT_EXCLUDE
    layers: tuple[str, ...] | None = None
    include_action_head: bool = False
    wbits_default: int = 4
    wbits: tuple[tuple[str, int], ...] = ()
    abits: int = 8
    act_pct: float = 99.9
    calib_steps: int = 32
    block: int = 16
    block_out: int | None = None
    ls: float = 0.15
    permute: bool = True
    row_rot: str = "restore"
    packdir: str = "./duquant_packed"
    dryrun: bool = False
    act_dynamic: bool = False
    rotation: str = "svd"
    backend: str = "reference"
    # Where each value came from ("default", "preset", "env", "override"), for the summary.
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    # ---- derived values -------------------------------------------------------------------
    @property
    def effective_block_out(self) -> int:
        return self.block if self.block_out is None else self.block_out

    @property
    def act_quant_enabled(self) -> bool:
        return 0 < self.abits < 16

    def wbits_for(self, name: str) -> int:
        """Weight bits of layer `name`: a WBITS override (exact name or name after a wrapper prefix) or the default."""
        for key, bits in self.wbits:
            if name == key or name.endswith("." + key):
                return bits
        return self.wbits_default

    def source_of(self, field_name: str) -> str:
        return dict(self.sources).get(field_name, "default")

    def pack_settings(self) -> dict[str, Any]:
        """The settings that change a layer's transforms or weight codes (part of the pack cache key)."""
        return {
            "block": self.block,
            "block_out": self.effective_block_out,
            "ls": self.ls,
            "permute": self.permute,
            "row_rot": self.row_rot,
            "rotation": self.rotation,
        }

    def summary_items(self) -> list[tuple[str, str, str]]:
        """(variable, value, source) for every setting, in the order of docs/contract.md, "Configuration"."""
        rows = []
        for spec in _FIELDS:
            value = getattr(self, spec.attr)
            rows.append((spec.env, spec.format(value), self.source_of(spec.attr)))
        return rows

    def describe(self) -> str:
        if not self.enabled:
            return "preset=fp (no quantization)"
        parts = [f"preset={self.preset}"]
        for env, value, source in self.summary_items():
            if source != "default":
                parts.append(f"{env}={value} ({source})")
        return " ".join(parts)


# ---- parsing of single values ------------------------------------------------------------------

def _err(env: str, raw: Any, allowed: str) -> DuQuantConfigError:
    return DuQuantConfigError(f"{ENV_PREFIX}{env}={raw!s}: {allowed}")


def _parse_bool(env: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise _err(env, raw, "must be a boolean: 0, 1, true or false")


def _parse_int(env: str, raw: Any, *, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        raise _err(env, raw, f"must be an integer{what}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _err(env, raw, f"must be an integer{what}")
    return value


def _parse_float(env: str, raw: Any, *, lo: float, hi: float, lo_open: bool, what: str) -> float:
    try:
        value = float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
    except ValueError:
        raise _err(env, raw, f"must be a number {what}") from None
    if value != value or value > hi or value < lo or (lo_open and value == lo):
        raise _err(env, raw, f"must be a number {what}")
    return value


def _parse_bits(env: str, raw: Any) -> int:
    return _parse_int(env, raw, lo=2, hi=32, what=" in 2..32 (>= 16 means not quantized)")


def _parse_abits(env: str, raw: Any) -> int:
    value = _parse_int(env, raw, lo=0, hi=32, what=" : 0 (off) or 2..32 (>= 16 means not quantized)")
    if value == 1:
        raise _err(env, raw, "must be 0 (off) or 2..32 (>= 16 means not quantized); 1 bit has no symmetric code")
    return value


def _parse_block(env: str, raw: Any) -> int:
    allowed = "must be a positive integer, a power of two (1, 2, 4, ..., 4096) so rotation blocks tile the layer"
    value = _parse_int(env, raw, lo=1, hi=4096, what=", a power of two (1, 2, 4, ..., 4096)")
    if value & (value - 1):
        raise _err(env, raw, allowed)
    return value


def _parse_block_out(env: str, raw: Any) -> int | None:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return None
    return _parse_block(env, raw)


def _parse_regex(env: str, raw: Any) -> str:
    text = str(raw)
    try:
        re.compile(text)
    except re.error as exc:
        raise _err(env, raw, f"must be a valid regular expression ({exc})") from None
    return text


def _parse_layers(env: str, raw: Any) -> tuple[str, ...] | None:
    if raw is None:
        return None
    items = [s.strip() for s in (raw.split(",") if isinstance(raw, str) else raw)]
    items = [s for s in items if s]
    if not items:
        raise _err(env, raw, "must be a comma-separated list of layer names (unset it to use INCLUDE/EXCLUDE)")
    return tuple(items)


def _parse_wbits_map(env: str, raw: Any) -> tuple[tuple[str, int], ...]:
    if isinstance(raw, Mapping):
        pairs = list(raw.items())
    elif isinstance(raw, (tuple, list)):
        pairs = list(raw)
    else:
        pairs = []
        for part in str(raw).split(","):
            part = part.strip()
            if not part:
                continue
            if ":" not in part:
                raise _err(env, raw, f"must be 'name:bits,name:bits'; entry {part!r} has no ':bits'")
            name, bits = part.rsplit(":", 1)
            pairs.append((name.strip(), bits))
    out = []
    for name, bits in pairs:
        if not name:
            raise _err(env, raw, "must be 'name:bits,name:bits'; an entry has an empty name")
        try:
            value = int(str(bits).strip())
        except ValueError:
            value = -1
        if not 2 <= value <= 32:
            raise _err(env, raw, f"bit width of {name!r} must be an integer in 2..32, got {bits!r}")
        out.append((name, value))
    return tuple(out)


def _parse_row_rot(env: str, raw: Any) -> str:
    text = str(raw).strip().lower()
    if text in ROW_ROT_MODES:
        return text
    if text in ROW_ROT_OFF_ALIASES:
        warnings.warn(
            f"{ENV_PREFIX}{env}={raw}: read as '0' (no row rotation); write 0, restore or propagate",
            DuQuantConfigWarning,
            stacklevel=4,
        )
        return "0"
    raise _err(env, raw, "must be one of 0, restore, propagate (none/off/false are read as 0)")


def _parse_choice(choices: tuple[str, ...]):
    def parse(env: str, raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in choices:
            raise _err(env, raw, f"must be one of {', '.join(choices)}")
        return text

    return parse


def _parse_backend(env: str, raw: Any) -> str:
    text = str(raw).strip().lower()
    if text in BACKENDS:
        return text
    # OPENPI_DUQUANT_TRITON=1 is the boolean spelling of backend=triton.
    return "triton" if _parse_bool(env, raw) else "reference"


def _parse_pct(env: str, raw: Any) -> float:
    return _parse_float(env, raw, lo=0.0, hi=100.0, lo_open=True, what="in (0, 100]")


def _parse_ls(env: str, raw: Any) -> float:
    return _parse_float(env, raw, lo=0.0, hi=1.0, lo_open=False, what="in [0, 1]")


def _parse_str(env: str, raw: Any) -> str:
    text = str(raw)
    if not text.strip():
        raise _err(env, raw, "must not be empty")
    return text


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return "(unset)"
    if isinstance(value, tuple):
        if value and isinstance(value[0], tuple):
            return ",".join(f"{k}:{v}" for k, v in value)
        return ",".join(value) if value else "(none)"
    return str(value)


@dataclass(frozen=True)
class _Field:
    env: str
    attr: str
    parse: Any
    format: Any = _fmt


_FIELDS: tuple[_Field, ...] = (
    _Field("DEBUG", "debug", _parse_bool),
    _Field("SCOPE", "scope", lambda env, raw: str(raw)),
    _Field("INCLUDE", "include", _parse_regex),
    _Field("EXCLUDE", "exclude", _parse_regex),
    _Field("LAYERS", "layers", _parse_layers),
    _Field("INCLUDE_ACTION_HEAD", "include_action_head", _parse_bool),
    _Field("WBITS_DEFAULT", "wbits_default", _parse_bits),
    _Field("WBITS", "wbits", _parse_wbits_map),
    _Field("ABITS", "abits", _parse_abits),
    _Field("ACT_PCT", "act_pct", _parse_pct),
    _Field("CALIB_STEPS", "calib_steps", lambda env, raw: _parse_int(env, raw, lo=1, what=" >= 1")),
    _Field("BLOCK", "block", _parse_block),
    _Field("BLOCK_OUT", "block_out", _parse_block_out),
    _Field("LS", "ls", _parse_ls),
    _Field("PERMUTE", "permute", _parse_bool),
    _Field("ROW_ROT", "row_rot", _parse_row_rot),
    _Field("PACKDIR", "packdir", _parse_str),
    _Field("DRYRUN", "dryrun", _parse_bool),
    _Field("ACT_DYNAMIC", "act_dynamic", _parse_bool),
    _Field("ROTATION", "rotation", _parse_choice(ROTATIONS)),
    _Field("TRITON", "backend", _parse_backend),
)
_BY_ENV = {f.env: f for f in _FIELDS}
_BY_ATTR = {f.attr: f for f in _FIELDS}
KNOWN_VARIABLES = tuple(ENV_PREFIX + f.env for f in _FIELDS) + (ENV_PREFIX + "PRESET",)

PRESETS: dict[str, dict[str, Any]] = {
    "a": dict(wbits_default=4, abits=8, block=16, permute=True, row_rot="restore", act_pct=99.9, calib_steps=32),
    "b": dict(wbits_default=4, abits=8, block=64, permute=False, row_rot="0", act_pct=98.0, calib_steps=64),
    "precision": dict(
        wbits_default=6, abits=8, block=32, permute=True, row_rot="restore", act_pct=99.9, calib_steps=64
    ),
    "speed": dict(wbits_default=4, abits=8, block=128, permute=False, row_rot="0", act_pct=98.0, calib_steps=64),
    "fp": {},
}
PRESET_NAMES = ("A", "B", "precision", "speed", "fp")
#: LIBERO success-rate drop (0.05 = 5 points) each preset may cost against FP; a new golden records this table
ALLOWED_DROP: dict[str, float] = {"A": 0.03, "B": 0.05, "precision": 0.02, "speed": 0.08}


def canonical_preset(name: str, *, source: str = "preset") -> str:
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise DuQuantConfigError(
            f"{source}={name}: unknown preset; choose one of {', '.join(PRESET_NAMES)} (case-insensitive)"
        )
    return {"a": "A", "b": "B"}.get(key, key)


def duquant_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The OPENPI_DUQUANT_* entries of `environ`."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}


def env_requests_duquant(environ: Mapping[str, str]) -> bool:
    """DuQuant is active when any OPENPI_DUQUANT_* variable other than PACKDIR is set (docs/contract.md,
    "Configuration")."""
    return any(k != ENV_PREFIX + "PACKDIR" for k in duquant_env(environ))


def from_env(
    environ: Mapping[str, str] | None = None,
    *,
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DuQuantConfig:
    """Build the config in force: overrides > OPENPI_DUQUANT_* variables > preset > defaults (preset A).

    `preset` is an explicit choice (CLI/pytest option) and beats OPENPI_DUQUANT_PRESET.
    `overrides` maps field names (``block``) or variable names (``BLOCK``/``OPENPI_DUQUANT_BLOCK``) to values.
    """
    import os

    env = duquant_env(os.environ if environ is None else environ)
    for name in sorted(env):
        short = name[len(ENV_PREFIX):]
        if short not in _BY_ENV and short != "PRESET":
            close = [k for k in _BY_ENV if _similar(k, short)]
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            warnings.warn(
                f"{name} is not a DuQuant setting and is ignored{hint}; known: "
                + ", ".join(f.env for f in _FIELDS),
                DuQuantConfigWarning,
                stacklevel=2,
            )

    if preset is not None:
        preset_name = canonical_preset(preset, source="--duquant-preset")
    elif ENV_PREFIX + "PRESET" in env:
        preset_name = canonical_preset(env[ENV_PREFIX + "PRESET"], source=ENV_PREFIX + "PRESET")
    else:
        preset_name = "A"

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if preset_name != "A":
        for attr, value in PRESETS[preset_name.lower()].items():
            values[attr] = value
            sources[attr] = "preset"
    else:
        for attr in PRESETS["a"]:
            sources[attr] = "preset" if (preset is not None or ENV_PREFIX + "PRESET" in env) else "default"

    for name, raw in env.items():
        field_spec = _BY_ENV.get(name[len(ENV_PREFIX):])
        if field_spec is None:
            continue
        values[field_spec.attr] = field_spec.parse(field_spec.env, raw)
        sources[field_spec.attr] = "env"

    for key, raw in (overrides or {}).items():
        field_spec = _resolve_override_key(key)
        values[field_spec.attr] = field_spec.parse(field_spec.env, raw) if raw is not None or field_spec.attr in (
            "block_out",
            "layers",
        ) else None
        sources[field_spec.attr] = "override"

    enabled = preset_name != "fp"
    sources = {k: v for k, v in sources.items() if k in _BY_ATTR}
    return DuQuantConfig(preset=preset_name, enabled=enabled, sources=tuple(sorted(sources.items())), **values)


def _resolve_override_key(key: str) -> _Field:
    short = key[len(ENV_PREFIX):] if key.startswith(ENV_PREFIX) else key
    if short.upper() in _BY_ENV:
        return _BY_ENV[short.upper()]
    if short in _BY_ATTR:
        return _BY_ATTR[short]
    raise DuQuantConfigError(
        f"override {key!r}: not a DuQuant setting; known: {', '.join(sorted(_BY_ATTR))}"
    )


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


def replace(config: DuQuantConfig, **changes: Any) -> DuQuantConfig:
    """A copy of `config` with validated changes (field names), marked as overrides."""
    sources = dict(config.sources)
    parsed = {}
    for key, raw in changes.items():
        spec = _resolve_override_key(key)
        parsed[spec.attr] = raw if raw is None else spec.parse(spec.env, raw)
        sources[spec.attr] = "override"
    return dataclasses.replace(config, sources=tuple(sorted(sources.items())), **parsed)
