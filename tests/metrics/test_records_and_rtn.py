"""metrics building blocks (records, capture) and plain RTN as a quantize_model method (fast, synthetic)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytest_duquant.baselines.rtn import RTNConfig, RTNLinear
from pytest_duquant.config import from_env, replace
from pytest_duquant.metrics.capture import InputCapture
from pytest_duquant.metrics.records import OutputError, layer_position, sqnr_db
from pytest_duquant.numerics import quantize_weight_rtn
from pytest_duquant.quantize import calibration, quantize_model


def test_sqnr_db_values():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref) == 200.0
    assert sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)  # error 0.1 -> 20 dB
    assert sqnr_db(ref, torch.zeros(100)) == pytest.approx(0.0)


def test_layer_position_parses_index_and_kind():
    assert layer_position("paligemma_with_expert.gemma_expert.model.layers.17.mlp.down_proj") == (
        17,
        "down_proj",
    )
    assert layer_position("encoder.layers.0.attn.q_proj") == (0, "q_proj")
    assert layer_position("action_out_proj") == (None, "action_out_proj")


def test_output_error_per_step_and_final():
    ref = [torch.ones(2, 3), 2 * torch.ones(2, 3)]
    test = [torch.ones(2, 3) * 1.1, 2 * torch.ones(2, 3)]
    e = OutputError.between(ref, test)
    assert e.per_step_rel_l2 == pytest.approx([0.1, 0.0])
    assert e.rel_l2 == 0.0 and e.max_abs == 0.0
    assert e.per_step_max_abs[0] == pytest.approx(0.1)


def test_rtn_linear_is_plain_per_channel_rtn_with_static_per_channel_activations():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    cfg = replace(from_env({}, preset="A"), scope="", layers=("lin",))
    model = nn.Sequential()
    model.add_module("lin", lin)
    report = quantize_model(model, RTNConfig(cfg))
    assert report.selected == ["lin"] and report.layers[0].method == "rtn"
    assert report.layers[0].bytes_after == (16 * 8 * 4) // 8 + 2 * 8 + 4 * 8  # int4 codes, fp16 scales, bias
    q = model.lin
    assert isinstance(q, RTNLinear)
    codes, scales = quantize_weight_rtn(lin.weight, 4)
    assert torch.equal(q.weight_q, codes.float() * scales[:, None])
    x = torch.randn(32, 16)
    with calibration(model):
        model(x)
    assert q.act_scale is not None and q.act_scale.shape == (16,)
    # the frozen static scale: the 99.9th percentile of |x| per input channel over 127
    expected = torch.quantile(x.abs(), 0.999, dim=0) / 127
    assert torch.allclose(q.act_scale, expected, rtol=1e-5)
    # off: exact
    exact = RTNLinear(lin, name="lin", wbits=16, abits=0, act_pct=99.9)
    assert torch.allclose(exact(x), lin(x), atol=1e-6)


def test_input_capture_thins_evenly_and_keeps_at_most_max_rows():
    lin = nn.Linear(4, 4)
    model = nn.Sequential()
    model.add_module("lin", lin)
    with InputCapture(model, ["lin"], max_rows=10) as cap:
        for i in range(8):
            model(torch.full((3, 4), float(i)))
    rows = cap.inputs()["lin"]
    assert rows.shape[1] == 4 and 5 <= rows.shape[0] <= 10
    assert rows[:, 0].unique().numel() >= 5  # spread over the calls, not only the first ones
    assert lin._forward_pre_hooks == {}  # hooks removed
