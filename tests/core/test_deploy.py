"""The deployed quantized layer (deploy.py): the same outputs as DuQuantLinear, bit for bit, from packed codes
only; and resident bytes that match the packed accounting."""

import copy

import pytest
import torch

from pytest_duquant.config import from_env, replace
from pytest_duquant.deploy import (
    PackedDuQuantLinear,
    code_layout,
    deploy_model,
    pack_codes,
    resident_bytes,
    unpack_codes,
)
from pytest_duquant.layer import DuQuantLinear
from pytest_duquant.quantize import calibration, quantize_model


def _quantized(tmp_path, k, preset, bias=True, **kw):
    torch.manual_seed(k)
    model = torch.nn.Sequential(torch.nn.Linear(k, 128, bias=bias), torch.nn.GELU(), torch.nn.Linear(128, k))
    with torch.no_grad():
        model[0].weight[:, 3] *= 20  # an outlier input channel
    config = replace(from_env({}, preset=preset), scope="", include=".*", exclude="^$",
                     packdir=str(tmp_path / "packs"), **kw)
    quantize_model(model, config)
    x = torch.randn(4, 7, k) * (1 + 5 * (torch.arange(k) == 1))
    if not config.act_dynamic:
        with calibration(model):
            model(x)
    return model, x


@pytest.mark.parametrize("k", [64, 96, 128])
@pytest.mark.parametrize("preset,kw", [("A", {}), ("B", {}), ("precision", {}), ("A", {"row_rot": "propagate"}),
                                       ("B", {"act_dynamic": True}), ("A", {"wbits_default": 16, "abits": 0}),
                                       ("A", {"wbits_default": 12})])
def test_deployed_layers_give_the_reference_outputs_bit_for_bit(tmp_path, k, preset, kw):
    """Bitwise, not within a tolerance: the deployed layer rebuilds weight_q by the same float32 operations
    (codes -> float32, x scales, cast) that DuQuantLinear ran once, and then runs the same forward."""
    model, x = _quantized(tmp_path, k, preset, **kw)
    deployed = copy.deepcopy(model)
    assert deploy_model(deployed) == 2
    for a, b in zip(model, deployed, strict=True):
        if isinstance(a, DuQuantLinear):
            assert isinstance(b, PackedDuQuantLinear)
            assert torch.equal(a.weight_q, b.weight_q)
    assert torch.equal(model(x), deployed(x))
    assert deploy_model(deployed) == 0  # idempotent


def test_a_deployed_layer_holds_packed_codes_and_no_weight_copy(tmp_path):
    model, x = _quantized(tmp_path, 128, "A")
    fp_bytes = sum(m.weight.numel() * 4 for m in (torch.nn.Linear(128, 128), torch.nn.Linear(128, 128)))
    before = resident_bytes(model)
    assert before.by_kind["float weight copy"] == fp_bytes  # what DuQuantLinear keeps today
    assert before.by_kind["int8 weight codes"] == fp_bytes // 4
    deploy_model(model)
    layer = model[0]
    assert {n for n, _ in layer.named_buffers()} == {"perm", "r_in", "r_out", "w_packed", "w_scales", "act_scale"}
    assert layer.w_packed.dtype == torch.uint8 and tuple(layer.w_packed.shape) == (128, 64)
    after = resident_bytes(model)
    assert "float weight copy" not in after.by_kind and "int8 weight codes" not in after.by_kind
    assert after.by_kind["packed weight codes"] == fp_bytes // 8  # 4 bits of a 32-bit weight
    assert after.total < 0.35 * before.total
    # the accounting the report prints (packed_bytes: fp16 transforms) is what the deployed layer holds,
    # up to the transforms' dtype (this model is float32: 4 bytes instead of 2)
    transforms = after.by_kind["transforms"]
    packed = sum(m.packed_bytes() for m in model if isinstance(m, DuQuantLinear))
    assert after.total - transforms / 2 - after.by_kind["activation scales"] - after.by_kind["weight scales"] / 2 \
        == pytest.approx(packed, rel=0.02)


@pytest.mark.parametrize("wbits,k", [(4, 128), (4, 64), (4, 5), (3, 7), (6, 9), (12, 3)])
def test_codes_pack_and_unpack_exactly(wbits, k):
    torch.manual_seed(wbits * k)
    q = (1 << (wbits - 1))
    codes = torch.randint(-q, q, (6, k), dtype=torch.int16 if wbits > 8 else torch.int8)
    layout = code_layout(wbits, k)
    packed = pack_codes(codes, layout)
    assert torch.equal(unpack_codes(packed, layout, k).to(codes.dtype), codes)
    per_code = {"int4-k128": 0.5, "int4-pairs": 0.5, "int8": 1, "int16": 2}[layout]
    assert packed.numel() * packed.element_size() == pytest.approx(6 * k * per_code, abs=6)


def test_a_dtype_cast_moves_the_scales_without_rounding_them(tmp_path):
    model, _ = _quantized(tmp_path, 128, "A")
    deploy_model(model)
    scales = model[0].w_scales.clone()
    model.to(torch.bfloat16)
    assert model[0].w_scales.dtype == torch.float32 and torch.equal(model[0].w_scales, scales)
    assert model[0].r_in.dtype == torch.bfloat16  # the transforms follow the model's dtype, as before


@pytest.mark.parametrize("preset", ["A", "B"])
def test_deployed_reference_expert_is_below_a_third_of_the_fp_linears(tmp_path, preset):
    """Real numbers on the shipped reference policy (float32, expert width 256): the quantized linears of the
    expert, deployed, hold <= 0.35x the bytes of the FP linears they replace (4-bit codes are 0.125x;
    the rest is the rotation blocks: BLOCK x in per layer, + BLOCK_OUT x out with a row rotation)."""
    from pytest_duquant.policies.reference import reference_checkpoint
    from pytest_duquant.policies.session import default_calibration_observations, policy_factory, policy_module

    policy = policy_factory(reference_checkpoint())()
    model = policy_module(policy)
    config = replace(from_env({}, preset=preset), packdir=str(tmp_path / "packs"))
    report = quantize_model(model, config)
    names = [r.name for r in report.layers]
    fp = sum(r.bytes_before for r in report.layers)
    assert len(names) == 28 and fp == sum(r.in_features * r.out_features * 4 for r in report.layers)
    obs = default_calibration_observations(1)
    with calibration(model):
        policy.infer(obs[0], 0)
    whole_before = resident_bytes(model).total
    deploy_model(model)
    held = sum(resident_bytes(model.get_submodule(n)).total for n in names)
    assert held <= 0.35 * fp, f"{preset}: {held} bytes deployed vs {fp} FP"
    assert held >= 0.125 * fp  # the codes alone
    # gone: the float copy (1x the FP bytes) and the int8 codes (0.25x); added: the packed codes (0.125x)
    assert whole_before - resident_bytes(model).total >= 1.1 * fp
