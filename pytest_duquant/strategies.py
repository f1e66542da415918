"""Hypothesis strategies: configs, weights with planted outlier channels, activations.

Values to compose, kept apart from the tests that draw them. Needs the `test` extra (hypothesis).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

BLOCKS = (1, 2, 4, 8, 16, 32, 64)
ROW_MODES = ("0", "restore", "propagate")


@st.composite
def layer_shapes(draw, max_dim: int = 96):
    """(out_features, in_features), including widths that a block does not divide."""
    out_f = draw(st.integers(1, max_dim))
    in_f = draw(st.integers(1, max_dim))
    return out_f, in_f


@st.composite
def transform_settings(draw):
    return {
        "block": draw(st.sampled_from(BLOCKS)),
        "block_out": draw(st.sampled_from(BLOCKS)),
        "permute": draw(st.booleans()),
        "row_rot": draw(st.sampled_from(ROW_MODES)),
        "ls": draw(st.sampled_from((0.0, 0.15, 0.5, 1.0))),
    }


def seeds():
    return st.integers(0, 2**31 - 1)


def weight_with_outliers(out_f: int, in_f: int, seed: int, n_outliers: int = 3, gain: float = 30.0,
                         dtype=torch.float64) -> torch.Tensor:
    """Gaussian weight whose `n_outliers` input channels are scaled by `gain` (planted outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    idx = torch.randperm(in_f, generator=g)[: min(n_outliers, in_f)]
    w[:, idx] *= gain
    return w


def activations(n: int, width: int, seed: int, outlier_channels: int = 2, gain: float = 20.0,
                dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g, dtype=dtype)
    idx = torch.randperm(width, generator=g)[: min(outlier_channels, width)]
    x[:, idx] *= gain
    return x


@st.composite
def weights(draw, max_dim: int = 96, outliers: bool | None = None):
    out_f, in_f = draw(layer_shapes(max_dim))
    seed = draw(seeds())
    n = draw(st.integers(0, 4)) if outliers is None else (3 if outliers else 0)
    return weight_with_outliers(out_f, in_f, seed, n_outliers=n)
