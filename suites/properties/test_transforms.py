"""Properties of the DuQuant transforms: orthogonality, permutation bijection, exact equivalence when off."""

import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from pytest_duquant.layer import DuQuantLinear
from pytest_duquant.numerics import (
    channel_energy,
    input_rotation,
    invert_permutation,
    output_rotation,
    smooth_energy,
    zigzag_permutation,
)
from pytest_duquant.packs import build_pack
from pytest_duquant.strategies import seeds, transform_settings, weight_with_outliers, weights

EYE_TOL = 1e-10


@given(weights(), st.sampled_from((1, 2, 4, 8, 16, 32, 64)))
def test_every_input_rotation_block_is_orthogonal(w, block):
    rot = input_rotation(w, block)
    mats = list(rot.blocks.unbind(0)) + ([rot.tail] if rot.tail is not None else [])
    assert rot.width == w.shape[1]
    for r in mats:
        eye = torch.eye(r.shape[0], dtype=r.dtype)
        assert torch.allclose(r @ r.T, eye, atol=EYE_TOL)
        assert torch.allclose(r.T @ r, eye, atol=EYE_TOL)


@given(weights(), st.sampled_from((1, 2, 4, 8, 16, 32, 64)))
def test_every_row_rotation_block_is_orthogonal(w, block):
    rot = output_rotation(w, block)
    dense = rot.dense()
    assert dense.shape == (w.shape[0], w.shape[0])
    assert torch.allclose(dense @ dense.T, torch.eye(w.shape[0], dtype=dense.dtype), atol=EYE_TOL)


@given(st.integers(1, 200), seeds(), st.floats(0, 1))
def test_zigzag_is_a_bijection_and_its_inverse_restores_order(n, seed, ls):
    e = smooth_energy(torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), ls)
    perm = zigzag_permutation(e)
    assert sorted(perm.tolist()) == list(range(n))
    x = torch.arange(n) * 7 + 3
    assert torch.equal(x[perm][invert_permutation(perm)], x)


@given(weights(), st.floats(0, 0.99))
def test_smoothing_never_changes_the_permutation(w, ls):
    """e <- (1 - LS) e + LS mean(e) is increasing for LS < 1: the energy order, hence P, is the same
    (docs/contract.md, "Algorithm" step 1). Energies closer than rounding could swap: excluded."""
    e = channel_energy(w)
    gaps = torch.diff(torch.sort(e).values)
    assume(gaps.numel() == 0 or bool(gaps.min() > 1e-9 * e.abs().max()))
    assert torch.equal(zigzag_permutation(smooth_energy(e, ls)), zigzag_permutation(e))


@given(st.integers(2, 200), seeds())
def test_zigzag_alternates_largest_and_smallest_energy(n, seed):
    e = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    perm = zigzag_permutation(e)
    order = torch.argsort(e, descending=True)
    assert perm[0] == order[0] and perm[1] == order[-1]
    if n >= 4:
        assert perm[2] == order[1] and perm[3] == order[-2]


@given(weights(max_dim=80), transform_settings(), seeds())
def test_wrapped_layer_with_quantization_off_reproduces_linear(w, settings, seed):
    out_f, in_f = w.shape
    lin = nn.Linear(in_f, out_f, bias=True, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(out_f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    pack = build_pack(lin.weight, wbits=16, **settings)
    layer = DuQuantLinear.from_pack(lin, pack, name="l", wbits=16, abits=0, block=settings["block"],
                                    block_out=settings["block_out"], row_rot=settings["row_rot"], act_pct=99.9,
                                    calib_steps=1)
    x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref = lin(x)
    y = layer(x)
    scale = ref.abs().max().item() + 1.0
    if settings["row_rot"] == "propagate":
        # y stays in the rotated basis: y = R_out (W x + b) in column form.
        expected = layer.output_rotation.apply_left(ref.T).T
    else:
        expected = ref
    assert torch.allclose(y, expected, atol=1e-9 * scale, rtol=0)


def test_propagate_differs_from_restore_so_the_basis_is_really_rotated():
    w = weight_with_outliers(32, 24, seed=3)
    lin = nn.Linear(24, 32, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(4, 24, dtype=torch.float64)
    outs = {}
    for mode in ("restore", "propagate"):
        pack = build_pack(lin.weight, wbits=16, block=8, block_out=8, ls=0.15, permute=True, row_rot=mode)
        layer = DuQuantLinear.from_pack(lin, pack, name="l", wbits=16, abits=0, block=8, block_out=8,
                                        row_rot=mode, act_pct=99.9, calib_steps=1)
        outs[mode] = layer(x)
    assert not torch.allclose(outs["restore"], outs["propagate"], atol=1e-3)
    assert torch.allclose(outs["restore"], lin(x), atol=1e-10)


@given(st.integers(0, 2**16), st.sampled_from((8, 16, 32)))
def test_greedy_permutation_and_rotation_lower_the_outlier_ratio(seed, block):
    """The paper's greedy rotation (ROTATION=greedy) spreads planted outlier channels over their block."""
    w = weight_with_outliers(64, 128, seed, n_outliers=3, gain=30.0)

    def outlier_ratio(m):
        col = m.abs().amax(dim=0)
        return (col.max() / col.mean()).item()

    pack = build_pack(w, wbits=16, block=block, block_out=block, ls=0.15, permute=True, row_rot="0",
                      rotation="greedy")
    assert outlier_ratio(pack.weight_t) < 0.6 * outlier_ratio(w)


@given(weights(max_dim=64), st.sampled_from((2, 4, 8, 16)))
def test_svd_rotation_compacts_each_block_into_its_singular_values(w, block):
    """The contract's rotation (docs/contract.md, "Algorithm" step 3: U of W_block^T) maps a block to V S:
    column norms are the descending singular values.

    This is why it does not spread planted outliers (docs/numerics.md): it aligns with them.
    """
    rot = input_rotation(w, block)
    b = min(block, w.shape[1])
    for k in range(w.shape[1] // b):
        blk = w[:, k * b:(k + 1) * b]
        norms = (blk @ rot.blocks[k]).norm(dim=0)
        sv = torch.linalg.svdvals(blk)
        expected = torch.zeros(b, dtype=w.dtype)
        expected[: sv.numel()] = sv
        assert torch.allclose(norms, expected, atol=1e-9 * (1 + sv.max().item()))


def test_energy_smoothing_pulls_toward_the_mean():
    e = torch.tensor([1.0, 2.0, 9.0], dtype=torch.float64)
    s = smooth_energy(e, 0.5)
    assert torch.allclose(s, torch.tensor([2.5, 3.0, 6.5], dtype=torch.float64))
    assert torch.allclose(channel_energy(torch.tensor([[1.0, 2.0], [3.0, 4.0]])),
                          torch.tensor([5.0, 10.0], dtype=torch.float64))


def test_input_transform_matches_the_dense_matrix_form():
    w = weight_with_outliers(16, 40, seed=5)
    pack = build_pack(w, wbits=16, block=16, block_out=16, ls=0.15, permute=True, row_rot="0")
    p = torch.eye(40, dtype=torch.float64)[:, pack.perm]  # x @ P == x[:, perm]
    r = pack.r_in.dense().to(torch.float64)
    assert torch.allclose(pack.weight_t.double(), w @ p @ r, atol=1e-4)
    x = torch.randn(3, 40, dtype=torch.float64)
    assert torch.allclose(F.linear(x @ p @ r, w @ p @ r), F.linear(x, w), atol=1e-8)
