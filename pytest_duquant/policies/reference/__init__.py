"""The reference policy: a small pi0.5-family policy trained here on scripted-expert LIBERO demonstrations.

It ships with the package (``checkpoint/``, openpi layout: model.safetensors, config.json, norm stats,
tokenizer.model, calibration.npz), so tests, goldens and ``duquant quantize`` have a policy that really
succeeds at LIBERO tasks without any download. How it was made: docs/reference.md.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"


def reference_checkpoint() -> Path:
    """Path of the shipped reference checkpoint (raises FileNotFoundError naming it when absent)."""
    if not (CHECKPOINT / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the reference checkpoint is missing at {CHECKPOINT} (model.safetensors); reinstall pytest-duquant "
            "from a checkout that has it (git lfs is not used: the file is committed as is)"
        )
    return CHECKPOINT


# ---- the quantization settings the reference policy is evaluated under (docs/reference-quantization.md) ----
_RTN = {"BLOCK": 1, "PERMUTE": 0, "ROW_ROT": "0"}  # block-1 rotations are the identity: no transforms
SETTINGS: dict[str, tuple[str, dict]] = {
    "fp": ("fp", {}),
    "B": ("B", {}),
    "rtn_w2": ("A", {**_RTN, "WBITS_DEFAULT": 2}),
    "A": ("A", {}),
    "speed": ("speed", {}),
    "precision": ("precision", {}),
    "rtn_w4a8": ("A", dict(_RTN)),
    "w3": ("A", {"WBITS_DEFAULT": 3}),
    "w2": ("A", {"WBITS_DEFAULT": 2}),
}
SABOTAGE = "rtn_w2"  # W2A8 round-to-nearest without transforms: the broken quantizer CI's gate must catch
HEALTHY = "A"  # the W4A8 preset CI runs beside it (PASS on 500 paired GPU episodes: docs/reference-quantization.md)

# CI's smoke plan: 2 init states x the 10 libero_object tasks of the golden, judged with a smoke allowance
# (with 20 paired episodes a drop can be shown below 20 points at best, never below a preset's 2-8).
SMOKE_SUITE = "libero_object"
SMOKE_TASKS = tuple(range(10))
SMOKE_TRIALS = (0, 1)
SMOKE_ALLOWED_DROP = 0.20


def setting_config(name: str, *, packdir: str | None = None, environ=None):
    """The DuQuantConfig of a named setting (preset + overrides); OPENPI_DUQUANT_* variables are ignored."""
    import os

    from pytest_duquant.config import from_env

    if name not in SETTINGS:
        raise ValueError(f"setting {name!r}: known settings are {', '.join(SETTINGS)}")
    preset, overrides = SETTINGS[name]
    env = os.environ if environ is None else environ
    clean = {k: v for k, v in env.items() if not k.startswith("OPENPI_DUQUANT_")}
    if packdir:
        overrides = {**overrides, "PACKDIR": packdir}
    return from_env(clean, preset=preset, overrides=overrides)
