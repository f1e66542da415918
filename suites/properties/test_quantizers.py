"""Properties of the quantizers: code range, error bound, idempotence, MSE scale choice, bits vs error."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from pytest_duquant.numerics import (
    PercentileObserver,
    fake_quant_sym,
    percentile_abs,
    qmax,
    quantize_per_token,
    quantize_weight_mse,
    quantize_weight_rtn,
)
from pytest_duquant.numerics.quantizers import quantize_codes
from pytest_duquant.strategies import activations, seeds, weights

BITS = st.integers(2, 8)


@given(weights(), BITS)
def test_weight_codes_lie_in_the_signed_range(w, bits):
    codes, scales = quantize_weight_mse(w, bits)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
    assert torch.all(scales > 0)


@given(st.integers(1, 64), st.integers(1, 64), seeds(), BITS)
def test_error_is_at_most_half_a_step_inside_the_clip(n, c, seed, bits):
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = x.abs().amax(dim=0).clamp_min(1e-6) / qmax(bits)
    q = fake_quant_sym(x, scale, bits)
    inside = x.abs() <= qmax(bits) * scale
    assert torch.all(((x - q).abs() <= scale / 2 + 1e-12)[inside])


@given(st.integers(1, 64), st.integers(1, 64), seeds(), BITS, st.floats(0.1, 2.0))
def test_quantization_is_idempotent(n, c, seed, bits, shrink):
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = shrink * x.abs().amax(dim=0).clamp_min(1e-6) / qmax(bits)
    once = fake_quant_sym(x, scale, bits)
    assert torch.equal(fake_quant_sym(once, scale, bits), once)


@given(weights(), BITS)
def test_mse_scale_is_never_worse_than_max_abs(w, bits):
    w = w.float()
    codes, scales = quantize_weight_mse(w, bits)
    rcodes, rscales = quantize_weight_rtn(w, bits)
    mse = ((codes.float() * scales[:, None] - w) ** 2).mean(dim=1)
    rtn = ((rcodes.float() * rscales[:, None] - w) ** 2).mean(dim=1)
    assert torch.all(mse <= rtn * (1 + 1e-6) + 1e-12)


@given(weights(max_dim=64), seeds())
def test_error_falls_as_bits_rise(w, seed):
    w = w.float()
    errs = []
    for bits in (2, 3, 4, 6, 8):
        codes, scales = quantize_weight_mse(w, bits)
        errs.append(((codes.float() * scales[:, None] - w) ** 2).sum().item())
    tol = 1e-9 * float((w**2).sum())  # single-entry rows are exact at every width, up to float rounding
    assert all(a >= b - tol for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < errs[0] or errs[0] <= tol


@given(st.integers(1, 32), st.integers(1, 48), seeds(), BITS)
def test_per_token_scales_cover_each_token_exactly(n, c, seed, bits):
    x = activations(n, c, seed)
    codes, scales = quantize_per_token(x, bits)
    assert scales.shape == (n, 1)
    assert torch.all(codes.abs().amax(dim=1) == qmax(bits))  # each token's max hits the top code
    assert torch.all((codes * scales - x).abs() <= scales / 2 + 1e-6)


def test_rounding_is_half_to_even_and_clamps_to_the_negative_code():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -100.0, 100.0])
    codes = quantize_codes(x, torch.tensor(1.0), 4)
    assert codes.tolist() == [0.0, 2.0, 2.0, -0.0, -8.0, 7.0]


def test_percentile_matches_torch_quantile_and_the_observer_keeps_the_running_max():
    x1 = torch.tensor([[1.0, -10.0], [3.0, 2.0], [-2.0, 4.0]])
    assert torch.allclose(percentile_abs(x1, 50.0), torch.tensor([2.0, 4.0]))
    obs = PercentileObserver(100.0)
    obs.observe(x1)
    obs.observe(torch.tensor([[5.0, 1.0]]))
    assert obs.calls == 2
    assert torch.allclose(obs.running, torch.tensor([5.0, 10.0]))
    assert torch.allclose(obs.scale(8), torch.tensor([5.0, 10.0]) / 127)
