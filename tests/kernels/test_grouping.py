"""Sibling grouping (CPU): which linears are grouped, and that a group changes nothing off the GPU."""

import pytest
import torch

from pytest_duquant.config import DuQuantConfig, replace
from pytest_duquant.kernels.grouping import SIBLING_NAMES
from pytest_duquant.kernels.packs import make_w4a8_group, make_w4a8_pack
from pytest_duquant.layer import DuQuantLinear
from pytest_duquant.quantize import group_siblings, quantize_model


def _linears(**shapes) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, (k, n) in shapes.items():
        setattr(module, name, torch.nn.Linear(k, n, bias=False))
    return module


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _linears(q_proj=(128, 256), k_proj=(128, 64), v_proj=(128, 64), o_proj=(256, 128))
        self.mlp = _linears(gate_proj=(128, 256), up_proj=(128, 256), down_proj=(256, 128))


def _quantized(backend: str, packdir):
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Block(), _Block())
    config = replace(DuQuantConfig(), scope="", backend=backend, act_dynamic=True, block=16, packdir=str(packdir))
    quantize_model(model, config)
    return model


def test_triton_backend_groups_qkv_and_gate_up_only(tmp_path):
    model = _quantized("triton", tmp_path)
    for block in model:
        attn, mlp = block.self_attn, block.mlp
        assert attn.q_proj.kernel_group is attn.k_proj.kernel_group is attn.v_proj.kernel_group is not None
        assert mlp.gate_proj.kernel_group is mlp.up_proj.kernel_group is not None
        assert attn.q_proj.kernel_group is not mlp.gate_proj.kernel_group
        assert attn.o_proj.kernel_group is None and mlp.down_proj.kernel_group is None
    assert group_siblings(model) == 2 * len(SIBLING_NAMES)  # idempotent: the same sets again


def test_reference_backend_has_no_groups_and_grouping_is_a_noop_on_cpu(tmp_path):
    ref_model = _quantized("reference", tmp_path)
    assert all(m.kernel_group is None for m in ref_model.modules() if isinstance(m, DuQuantLinear))
    tri_model = _quantized("triton", tmp_path)
    x = torch.randn(3, 128)
    for a, b in zip(ref_model, tri_model, strict=True):
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(a.self_attn, name)(x), getattr(b.self_attn, name)(x))


def test_group_pack_members_are_views_and_mismatches_are_named():
    torch.manual_seed(0)
    eye = torch.eye(16).expand(8, 16, 16)
    packs = [
        make_w4a8_pack(perm=None, r_in=eye, w_codes=torch.randint(-8, 8, (n, 128), dtype=torch.int8),
                       w_scales=torch.rand(n))
        for n in (128, 64)
    ]
    group = make_w4a8_group(packs)
    assert group.widths == (128, 64) and group.tile_member.tolist() == [0, 0, 1]
    assert group.packs[1].w_packed.data_ptr() == group.w_packed[128:].data_ptr()
    assert torch.equal(group.packs[1].w_packed, packs[1].w_packed)
    parts = group.split(torch.arange(2 * 192).reshape(2, 192))
    assert [p.shape[-1] for p in parts] == [128, 64] and int(parts[1][0, 0]) == 128
    odd = make_w4a8_pack(perm=None, r_in=eye, w_codes=torch.randint(-8, 8, (96, 128), dtype=torch.int8),
                         w_scales=torch.rand(96))
    with pytest.raises(ValueError, match="out_features=96 is not a multiple of 64"):
        make_w4a8_group([packs[0], odd])
