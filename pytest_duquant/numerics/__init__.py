"""Pure DuQuant math (docs/contract.md, "Algorithm"): no pytest, no I/O, no global state."""

from pytest_duquant.numerics.calibration import PercentileObserver, percentile_abs
from pytest_duquant.numerics.permutation import channel_energy, invert_permutation, smooth_energy, zigzag_permutation
from pytest_duquant.numerics.quantizers import (
    fake_quant_sym,
    qmax,
    quantize_per_token,
    quantize_weight_mse,
    quantize_weight_rtn,
)
from pytest_duquant.numerics.rotation import (
    BlockRotation,
    canonical_basis,
    canonical_signs,
    greedy_block_rotation,
    greedy_input_rotation,
    input_rotation,
    output_rotation,
)

__all__ = [
    "channel_energy",
    "smooth_energy",
    "zigzag_permutation",
    "invert_permutation",
    "BlockRotation",
    "canonical_basis",
    "canonical_signs",
    "input_rotation",
    "greedy_input_rotation",
    "greedy_block_rotation",
    "output_rotation",
    "qmax",
    "fake_quant_sym",
    "quantize_weight_mse",
    "quantize_weight_rtn",
    "quantize_per_token",
    "PercentileObserver",
    "percentile_abs",
]
