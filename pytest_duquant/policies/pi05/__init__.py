"""Built-in PyTorch pi0.5 policy: openpi/lerobot checkpoints, LIBERO processing, seeded sampling.

Heavy modules are imported lazily so `import pytest_duquant.policies.pi05` stays cheap.
"""

from __future__ import annotations

_EXPORTS = {
    "Pi05Config": "configuration",
    "variant_config": "configuration",
    "Pi05Model": "modeling",
    "build_model": "modeling",
    "init_random_weights": "modeling",
    "random_model": "modeling",
    "CheckpointError": "errors",
    "detect_layout": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "random_norm_stats": "checkpoint",
    "NormStats": "processing",
    "QuantileStats": "processing",
    "synthetic_observations": "processing",
    "PaligemmaTokenizer": "tokenizer",
    "resolve_tokenizer_path": "tokenizer",
    "Pi05Policy": "policy",
    "build_policy": "policy",
    "load_policy": "policy",
    "noise_for_seed": "policy",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
