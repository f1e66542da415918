"""The canonical form of a rotation basis (docs/contract.md, "Conventions"): one pack per weight, whatever
order and signs the eigen solver returns, whatever device or float type the weight comes in."""

import pytest
import torch

import pytest_duquant.numerics.rotation as rotation
from pytest_duquant import packs
from pytest_duquant.numerics import canonical_basis, canonical_signs, input_rotation, output_rotation
from pytest_duquant.packs import build_pack, pack_key

SETTINGS = [
    dict(wbits=4, block=16, block_out=16, ls=0.15, permute=True, row_rot="restore"),  # preset A
    dict(wbits=4, block=64, block_out=64, ls=0.15, permute=False, row_rot="0"),  # preset B
    dict(wbits=6, block=32, block_out=32, ls=0.15, permute=True, row_rot="propagate"),
]


def _weight(out_f=96, in_f=80, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    w[:, 3] *= 20  # an outlier channel, as trained weights have
    return w.to(dtype)


def _assert_same_pack(a, b):
    assert (a.perm is None) == (b.perm is None) and (a.perm is None or torch.equal(a.perm, b.perm))
    assert torch.equal(a.r_in.blocks, b.r_in.blocks)
    assert (a.r_out is None) == (b.r_out is None)
    if a.r_out is not None:
        assert torch.equal(a.r_out.blocks, b.r_out.blocks)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def _scrambling_eigh(seed):
    """torch.linalg.eigh, but each matrix's eigenpairs come back in a random order with random signs."""
    real = torch.linalg.eigh
    g = torch.Generator().manual_seed(seed)

    def eigh(m):
        vals, vecs = real(m)
        order = torch.stack([torch.randperm(vals.shape[-1], generator=g) for _ in range(vals.shape[0])])
        signs = torch.randint(0, 2, vals.shape, generator=g).to(vecs.dtype) * 2 - 1
        vals = torch.gather(vals, -1, order)
        vecs = torch.gather(vecs, -1, order.unsqueeze(-2).expand_as(vecs)) * signs.unsqueeze(-2)
        return vals, vecs

    return eigh


def test_every_column_has_its_largest_entry_positive():
    w = _weight()
    for rot in (input_rotation(w, 16), output_rotation(w, 16)):
        u = rot.blocks
        lead = torch.gather(u, -2, u.abs().argmax(dim=-2, keepdim=True))
        assert (lead > 0).all()


def test_a_tie_goes_to_the_lowest_row():
    s = 2**-0.5
    u = torch.tensor([[-s, s], [s, s]], dtype=torch.float64)  # column 0: |entries| tied, row 0 negative
    out = canonical_signs(u)
    assert torch.equal(out, torch.tensor([[s, s], [-s, s]], dtype=torch.float64))
    # a difference below the tie tolerance is still a tie
    u2 = torch.tensor([[-0.7071067, 0.0], [0.70710675, 1.0]], dtype=torch.float64)
    assert canonical_signs(u2)[0, 0] > 0


@pytest.mark.parametrize("seed", range(4))
def test_canonical_basis_ignores_the_solver_order_and_signs(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(5, 12, 40, generator=g, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(a @ a.transpose(-1, -2))
    ref = canonical_basis(vals, vecs)
    v2, u2 = _scrambling_eigh(seed)(a @ a.transpose(-1, -2))
    assert torch.equal(canonical_basis(v2, u2), ref)
    assert torch.equal(canonical_basis(vals, -vecs), ref)
    # descending eigenvalue order: column norms of A^T U are the descending singular values
    sv = (a.transpose(-1, -2) @ ref).norm(dim=-2)
    assert (sv[..., :-1] >= sv[..., 1:] - 1e-9).all()


@pytest.mark.parametrize("settings", SETTINGS, ids=["A", "B", "propagate-W6"])
@pytest.mark.parametrize("seed", range(3))
def test_pack_is_the_same_whatever_order_and_signs_the_solver_returns(monkeypatch, settings, seed):
    w = _weight(seed=seed)
    ref = build_pack(w, **settings)
    monkeypatch.setattr(rotation.torch.linalg, "eigh", _scrambling_eigh(seed + 100))
    _assert_same_pack(build_pack(w, **settings), ref)


@pytest.mark.parametrize("settings", SETTINGS, ids=["A", "B", "propagate-W6"])
def test_pack_is_the_same_for_float32_float64_and_bfloat16_copies_of_one_weight(settings):
    w = _weight(dtype=torch.bfloat16)  # values every float type holds exactly
    ref = build_pack(w, **settings)
    for dtype in (torch.float32, torch.float64):
        _assert_same_pack(build_pack(w.to(dtype), **settings), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pack_is_the_same_for_a_cuda_weight():
    w = _weight()
    _assert_same_pack(build_pack(w.cuda(), **SETTINGS[0]), build_pack(w, **SETTINGS[0]))


def test_pack_key_covers_the_algorithm(monkeypatch):
    w = _weight()
    settings = {"block": 16, "wbits": 4}
    key = pack_key("layer", w, settings)
    assert pack_key("layer", w.clone(), dict(settings)) == key
    assert pack_key("layer", w.double(), settings) != key  # dtype is part of the weight digest
    monkeypatch.setattr(packs, "SIGN_CONVENTION", "another convention")
    assert pack_key("layer", w, settings) != key
    monkeypatch.undo()
    monkeypatch.setattr(packs, "PACK_FORMAT", packs.PACK_FORMAT + 1)
    assert pack_key("layer", w, settings) != key
    monkeypatch.undo()
    monkeypatch.setattr(packs, "MSE_GRID", (1.0,))
    assert pack_key("layer", w, settings) != key
