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


def test_held_outputs_work_on_inference_tensors_and_expire():
    """torch.inference_mode(): no version counter to read (x._version raised); the held outputs are served
    once per member for the same input and dropped for any other."""
    from pytest_duquant.kernels.grouping import HeldOutputs, tensor_version

    q, k, v = object(), object(), object()
    with torch.inference_mode():
        x = torch.randn(3, 8)
        assert x.is_inference() and tensor_version(x) is None
        held = HeldOutputs()
        held.hold(x, {k: "k-out", v: "v-out"})
        assert held.take(k, x) == "k-out"
        assert held.take(k, x) is None  # taken once
        held.hold(x, {k: "k-out", v: "v-out"})
        assert held.take(v, torch.randn(3, 8)) is None and held.take(k, x) is None  # another input: dropped
    y = torch.randn(3, 8)
    held.hold(y, {q: "q-out"})
    y.add_(1)  # a normal tensor changed in place: its version moved, the held output is stale
    assert held.take(q, y) is None


def test_kernel_pack_key_of_a_model_quantized_under_inference_mode(tmp_path):
    from pytest_duquant.kernels.dispatch import kernel_pack_key

    model = _quantized("triton", tmp_path)
    layer = model[0].self_attn.q_proj
    with torch.inference_mode():  # e.g. scales loaded or codes rebuilt inside inference_mode
        layer.w_codes = layer.w_codes.clone()
        layer.act_scale = torch.ones(layer.in_features)
        assert layer.w_codes.is_inference()
        key = kernel_pack_key(layer, torch.bfloat16)
        assert key == kernel_pack_key(layer, torch.bfloat16) and key[3] is None and key[4][1] is None


def test_a_deployed_group_keeps_one_copy_of_the_codes(tmp_path):
    """Grouping deployed siblings (CPU: the packs are pure torch) repoints their code buffers into the group's
    concatenated tensor instead of keeping both, and a second call reuses the group."""
    from pytest_duquant.deploy import deploy_model, resident_bytes

    model = _quantized("triton", tmp_path)
    deploy_model(model)
    attn = model[0].self_attn
    before = resident_bytes(attn)
    group = attn.q_proj.kernel_group._group_pack(torch.bfloat16)
    assert group is not None and attn.q_proj.kernel_group._group_pack(torch.bfloat16) is group
    assert attn.k_proj.w_packed.untyped_storage().data_ptr() == group.w_packed.untyped_storage().data_ptr()
    after = resident_bytes(attn)
    codes = sum(m.w_packed.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
    assert after.by_kind["packed weight codes"] == codes
    assert after.total - before.total < codes  # the group adds its bf16 rotations, not another copy of the codes


def test_a_quantized_geglu_mlp_gets_the_fused_path_which_changes_nothing_off_the_gpu(tmp_path, monkeypatch):
    """group_siblings marks a MLP whose gate/up are grouped and whose down is quantized; the pi0.5 MLP honours the
    mark, and on a CPU (or with GEGLU_PROLOGUE off) the fused path declines, so the outputs are unchanged."""
    from pytest_duquant.kernels import grouping
    from pytest_duquant.policies.pi05.configuration import GemmaSpec
    from pytest_duquant.policies.pi05.modeling import GemmaMLP

    model = _quantized("triton", tmp_path)
    assert all(block.mlp.__dict__.get("fused_forward") is grouping.geglu_mlp_forward for block in model)
    assert "fused_forward" not in model[0].self_attn.__dict__
    ref = _quantized("reference", tmp_path)
    assert all("fused_forward" not in block.mlp.__dict__ for block in ref)

    torch.manual_seed(1)
    spec = GemmaSpec(width=128, depth=1, mlp_dim=256, num_heads=2, num_kv_heads=1, head_dim=64)
    mlp = GemmaMLP(spec)
    x = torch.randn(2, 5, 128)
    quantize_model(mlp, replace(DuQuantConfig(), scope="", backend="triton", act_dynamic=True, block=16,
                                packdir=str(tmp_path / "mlp")))
    assert mlp.__dict__["fused_forward"] is grouping.geglu_mlp_forward
    before = mlp(x)
    monkeypatch.setattr(grouping, "GEGLU_PROLOGUE", True)
    assert grouping.geglu_mlp_forward(mlp, x) is None  # a CPU input: declined
    assert torch.equal(mlp(x), before)
    del mlp.__dict__["fused_forward"]
    assert torch.equal(mlp(x), before)
