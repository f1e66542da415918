"""pytest-duquant: DuQuant (rotation + permutation outlier smoothing) for the pi0.5 policy, tested and gated.

Entry points: `DuQuantConfig` / `config.from_env`, `quantize_model(model, config)`.
"""

from pytest_duquant.config import DuQuantConfig, DuQuantConfigError, from_env

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package must not import torch-heavy modules
    if name in ("quantize_model", "QuantReport", "DuQuantError"):
        from pytest_duquant import quantize

        return getattr(quantize, name)
    if name == "DuQuantLinear":
        from pytest_duquant.layer import DuQuantLinear

        return DuQuantLinear
    raise AttributeError(name)


__all__ = ["DuQuantConfig", "DuQuantConfigError", "from_env", "quantize_model", "QuantReport", "DuQuantLinear"]
