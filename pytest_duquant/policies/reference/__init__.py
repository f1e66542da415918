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
