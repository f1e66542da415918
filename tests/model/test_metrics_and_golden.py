"""model_metrics building blocks and the model golden file format / comparison (fast, synthetic)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from pytest_duquant import golden_model as gm
from pytest_duquant.config import from_env, replace
from pytest_duquant.model_metrics import (
    InputCapture,
    LayerError,
    ModelMetrics,
    OutputError,
    RTNLinear,
    calibrating,
    layer_position,
    numeric_settings,
    rtn_quantize_model,
    sqnr_db,
)
from pytest_duquant.numerics import quantize_weight_rtn


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
    assert rtn_quantize_model(model, cfg) == ["lin"]
    q = model.lin
    assert isinstance(q, RTNLinear)
    codes, scales = quantize_weight_rtn(lin.weight, 4)
    assert torch.equal(q.weight_q, codes.float() * scales[:, None])
    x = torch.randn(32, 16)
    with calibrating(model):
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


# ---- goldens ---------------------------------------------------------------------------------------
def _metrics(sqnr=(20.0, 18.0, 25.0), rel=0.02, fingerprint="abc123", preset="B") -> ModelMetrics:
    layers = [
        LayerError(
            name=f"m.layers.{i}.q_proj",
            index=i,
            kind="q_proj",
            shape=[8, 16],
            wbits=4,
            sqnr_db=s,
            rtn_sqnr_db=s - 1.0,
            rows=64,
        )
        for i, s in enumerate(sqnr)
    ]
    out = OutputError(rel, 0.1, [rel / 2, rel], [0.05, 0.1])
    return ModelMetrics(
        model="pi05:dummy",
        fingerprint=fingerprint,
        preset=preset,
        settings=numeric_settings(from_env({}, preset=preset)),
        protocol={"calibration": {"calls": 64}},
        output=out,
        output_rtn=OutputError(rel * 1.1, 0.12, [rel, rel * 1.1], [0.06, 0.12]),
        layers=layers,
        bytes_before=3000,
        bytes_after=900,
        info={"threads": 1},
    )


def test_golden_roundtrip_is_schema_valid_and_human_readable(tmp_path):
    m = _metrics()
    doc = gm.to_golden(m, "B")
    path = gm.write(tmp_path / "abc123" / "B.json", doc)
    text = path.read_text()
    assert text.count("\n") > 40 and '"per_step_rel_l2": [0.01, 0.02]' in text
    assert gm.load(path) == json.loads(text)
    assert gm.compare(gm.load(path), m).ok


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("metrics"), "metrics: must be an object"),
        (lambda d: d.update(schema="other"), "schema: must be"),
        (lambda d: d["layers"][1].update(sqnr_db="x"), "layers[1].sqnr_db: must be a finite number"),
        (lambda d: d["layers"].append(dict(d["layers"][0])), "duplicate layer"),
        (lambda d: d["tolerances"].pop("sqnr_db"), "tolerances.sqnr_db"),
        (lambda d: d["metrics"]["output"].update(rel_l2=-1), "metrics.output.rel_l2"),
    ],
)
def test_golden_schema_errors_name_the_key(tmp_path, mutate, message):
    doc = gm.to_golden(_metrics(), "B")
    mutate(doc)
    p = tmp_path / "g.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(gm.GoldenSchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        gm.load(p)


def test_compare_within_tolerance_passes_and_beyond_fails_with_worst_layers_table():
    golden = gm.to_golden(_metrics(), "B")
    near = _metrics(sqnr=(20.1, 17.95, 25.0), rel=0.0205)
    assert gm.compare(golden, near).ok
    bad = _metrics(sqnr=(20.0, 16.5, 25.0), rel=0.03)
    cmp = gm.compare(golden, bad, "g.json")
    assert not cmp.ok
    report = cmp.report()
    assert (
        "m.layers.1.q_proj"
        in report.splitlines()[
            cmp.report()
            .splitlines()
            .index(next(line for line in report.splitlines() if line.startswith("worst layers")))
            + 2
        ]
    )
    assert "<-- beyond tolerance" in report and "-1.50" in report
    assert any("output.rel_l2" in f for f in cmp.failures)
    assert any(f.startswith("mean SQNR") for f in cmp.failures)


def test_each_output_figure_has_its_own_tolerance():
    """max abs (one extreme value) and relative L2 (an average) spread differently: one rtol each."""
    golden = gm.to_golden(_metrics(), "B", {"output_rel_l2_rtol": 0.3, "output_max_abs_rtol": 0.001})
    m = _metrics(rel=0.021)  # rel L2 +5%: within 30%
    m.output.max_abs = 0.1002  # max abs +0.2%: beyond 0.1%
    failures = gm.compare(golden, m).failures
    assert any(f.startswith("output.max_abs") for f in failures)
    assert not any(f.startswith("output.rel_l2") for f in failures)


def test_new_goldens_take_the_tolerances_measured_for_their_precision():
    m = _metrics()
    assert gm.to_golden(m, "B")["tolerances"] == gm.DEFAULT_TOLERANCES  # protocol says no dtype
    m.protocol = {**m.protocol, "dtype": "float64"}
    tol = gm.to_golden(m, "B")["tolerances"]
    assert tol == {**gm.DEFAULT_TOLERANCES, **gm.FLOAT64_TOLERANCES}
    assert tol["output_max_abs_rtol"] < gm.DEFAULT_TOLERANCES["output_rtol"]


def test_an_improvement_beyond_tolerance_also_fails():
    """A layer that silently stopped quantizing looks like an improvement; it must not pass unnoticed."""
    golden = gm.to_golden(_metrics(), "B")
    cmp = gm.compare(golden, _metrics(sqnr=(20.0, 18.0, 60.0)))
    assert not cmp.ok and "+35.00" in cmp.report()


def test_bytes_must_match_exactly():
    golden = gm.to_golden(_metrics(), "B")
    m = _metrics()
    m.bytes_after += 1
    assert any("bytes_after" in f for f in gm.compare(golden, m).failures)


def test_golden_of_another_checkpoint_or_settings_is_never_used(tmp_path):
    m = _metrics()
    doc = gm.to_golden(m, "B")
    other = _metrics(fingerprint="fff000")
    with pytest.raises(gm.GoldenMismatch, match="fingerprint abc123.*fff000.*never used"):
        gm.compare(doc, other)
    changed = _metrics()
    changed.settings = dict(changed.settings, block=32)
    with pytest.raises(gm.GoldenMismatch, match="block: golden 64 vs run 32"):
        gm.compare(doc, changed)
    # on disk: the file lives under the fingerprint, another fingerprint finds nothing and says so
    gm.write(gm.golden_path(tmp_path, "abc123", "B"), doc)
    with pytest.raises(gm.GoldenMissing, match="only for other checkpoint fingerprints \\(abc123\\)"):
        gm.check_or_update(other, "B", tmp_path)


def test_update_rewrites_explicitly_and_says_what_changed(tmp_path):
    first = gm.check_or_update(_metrics(), "B", tmp_path, update=True)
    assert first.updated and "new golden" in first.message
    second = gm.check_or_update(_metrics(sqnr=(20.0, 16.0, 25.0), rel=0.03), "B", tmp_path, update=True)
    assert "mean SQNR 21.000 -> 20.333 dB" in second.message
    assert "1 layer(s) moved by more than 0.3 dB: m.layers.1.q_proj -2.00" in second.message
    assert "output rel L2 0.02 -> 0.03" in second.message
    again = gm.check_or_update(_metrics(sqnr=(20.0, 16.0, 25.0), rel=0.03), "B", tmp_path)
    assert not again.updated and again.comparison.ok
    before = (tmp_path / "abc123" / "B.json").read_text()
    same = gm.check_or_update(_metrics(sqnr=(20.0, 16.0, 25.0), rel=0.03), "B", tmp_path, update=True)
    assert not same.updated and "unchanged" in same.message
    assert (tmp_path / "abc123" / "B.json").read_text() == before  # no churn of dates


def test_golden_name_follows_the_settings():
    pure = numeric_settings(from_env({}, preset="B"))
    assert gm.golden_name("B", pure, pure) == "B"
    assert gm.golden_name("B", dict(pure, rotation="greedy"), pure) == "B-greedy"
    custom = gm.golden_name("B", dict(pure, block=32), pure)
    assert custom.startswith("B-custom-") and custom != gm.golden_name("B", dict(pure, block=16), pure)


def test_committed_goldens_are_schema_valid():
    root = gm.default_root()
    files = sorted(root.glob("*/*.json"))
    assert files, f"no committed model goldens under {root}"
    for f in files:
        doc = gm.load(f)
        assert f.parent.name == doc["fingerprint"] and f.stem == doc["name"]


def test_metrics_dict_roundtrip():
    m = _metrics()
    back = ModelMetrics.from_dict(copy.deepcopy(m.to_dict()))
    assert back.to_dict() == m.to_dict()
