import copy
import logging

import pytest
import torch

from pytest_duquant.config import from_env, replace
from pytest_duquant.layer import DuQuantLinear
from pytest_duquant.packs import PackCache
from pytest_duquant.quantize import DuQuantError, calibration, quantize_model

from .expert_stack import ExpertShapedPolicy

EXPERT = "paligemma_with_expert.gemma_expert.model.layers."


def cfg(tmp_path, preset="A", **kw):
    return replace(from_env({}, preset=preset), packdir=str(tmp_path / "packs"), **kw)


def wrapped(model):
    return {n for n, m in model.named_modules() if isinstance(m, DuQuantLinear)}


def test_default_selection_is_the_seven_expert_projections_per_layer(tmp_path):
    model = ExpertShapedPolicy(depth=3)
    report = quantize_model(model, cfg(tmp_path))
    names = wrapped(model)
    assert len(names) == 3 * 7 == len(report.layers)
    for i in range(3):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"{EXPERT}{i}.{proj}" in names
    assert not any("layernorm" in n or "action" in n for n in names)


def test_action_head_only_with_include_action_head(tmp_path):
    model = ExpertShapedPolicy()
    quantize_model(model, cfg(tmp_path, include_action_head=True))
    assert "action_out_proj" in wrapped(model) and "action_in_proj" not in wrapped(model)


def test_layers_list_replaces_include_and_wbits_overrides_per_layer(tmp_path):
    model = ExpertShapedPolicy()
    q = f"{EXPERT}0.self_attn.q_proj"
    report = quantize_model(model, cfg(tmp_path, layers=f"{q},{EXPERT}1.input_layernorm.dense", wbits=f"{q}:8"))
    assert wrapped(model) == {q, f"{EXPERT}1.input_layernorm.dense"}
    assert {r.name: r.wbits for r in report.layers}[q] == 8


def test_scope_also_matches_after_a_wrapper_prefix(tmp_path):
    outer = torch.nn.Module()
    outer.model = ExpertShapedPolicy()
    quantize_model(outer, cfg(tmp_path))
    assert len(wrapped(outer)) == 14 and all(n.startswith("model.paligemma") for n in wrapped(outer))


def test_dry_run_changes_nothing_and_returns_the_plan(tmp_path):
    model = ExpertShapedPolicy()
    before = copy.deepcopy(model.state_dict())
    report = quantize_model(model, cfg(tmp_path, dryrun=True))
    assert report.dryrun and len(report.selected) == 14 and not report.layers
    assert not wrapped(model) and not (tmp_path / "packs").exists()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert "would be quantized" in report.summary()


def test_quantizing_twice_is_refused_before_anything_changes(tmp_path):
    model = ExpertShapedPolicy()
    quantize_model(model, cfg(tmp_path))
    snapshot = {n: id(m) for n, m in model.named_modules()}
    with pytest.raises(DuQuantError, match="already quantized"):
        quantize_model(model, cfg(tmp_path))
    assert {n: id(m) for n, m in model.named_modules()} == snapshot


def test_fp_preset_quantizes_nothing(tmp_path):
    model = ExpertShapedPolicy()
    report = quantize_model(model, cfg(tmp_path, preset="fp"))
    assert not wrapped(model) and not report.layers


def test_quantized_output_is_close_but_not_equal_to_fp(tmp_path):
    model = ExpertShapedPolicy(width=64, hidden=128)
    x = torch.randn(2, 10, 8)
    ref = model(x)
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, cfg(tmp_path))
    y = qmodel(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.3


def test_pack_cache_is_keyed_by_weights_and_settings(tmp_path):
    base = ExpertShapedPolicy()
    m1 = copy.deepcopy(base)
    r1 = quantize_model(m1, cfg(tmp_path))
    assert not any(r.cached for r in r1.layers)
    m2 = copy.deepcopy(base)
    r2 = quantize_model(m2, cfg(tmp_path))
    assert all(r.cached for r in r2.layers)
    x = torch.randn(1, 4, 8)
    assert torch.equal(m1(x), m2(x))
    # A changed BLOCK or changed weights never reuse a stale pack.
    r3 = quantize_model(copy.deepcopy(base), cfg(tmp_path, block=8))
    assert not any(r.cached for r in r3.layers)
    other = ExpertShapedPolicy(seed=1)
    r4 = quantize_model(other, cfg(tmp_path))
    assert not any(r.cached for r in r4.layers)


def test_a_damaged_pack_is_recomputed_not_loaded(tmp_path, caplog):
    base = ExpertShapedPolicy()
    quantize_model(copy.deepcopy(base), cfg(tmp_path))
    files = sorted((tmp_path / "packs").glob("*.pt"))
    assert files and not list((tmp_path / "packs").glob(".tmp-*"))
    files[0].write_bytes(files[0].read_bytes()[:100])  # as if a crash had truncated it
    with caplog.at_level(logging.WARNING, logger="duquant"):
        report = quantize_model(copy.deepcopy(base), cfg(tmp_path))
    assert "unreadable" in caplog.text
    assert sum(not r.cached for r in report.layers) == 1


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    cache = PackCache(tmp_path / "p")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    from pytest_duquant.packs import build_pack

    pack = build_pack(torch.randn(8, 8), wbits=4, block=4, block_out=4, ls=0.1, permute=True, row_rot="0")
    with pytest.raises(OSError):
        cache.save("x", "k", pack)
    assert list((tmp_path / "p").iterdir()) == []


def test_logger_prints_the_per_layer_block_and_summary(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="duquant"):
        report = quantize_model(ExpertShapedPolicy(), cfg(tmp_path, preset="B"))
    text = caplog.text
    assert f"Quantizing layer: {EXPERT}0.mlp.up_proj" in text
    assert "Weight shape: [64, 32]" in text and "Quantized to W4A8, block=64" in text and "Memory saved:" in text
    assert report.summary() in text and "14 layers" in report.summary()


def test_report_bytes_count_packed_int4_codes(tmp_path):
    model = ExpertShapedPolicy(width=64, hidden=256)
    report = quantize_model(model, cfg(tmp_path, preset="B"))
    rec = {r.name: r for r in report.layers}[f"{EXPERT}0.mlp.up_proj"]
    n = 64 * 256
    assert rec.bytes_before == 4 * n  # float32
    assert rec.bytes_after == n // 2 + 2 * 256 + 2 * 64 * 64  # int4 codes + fp16 scales + one 64-block rotation
    assert report.to_dict()["bytes_after"] == report.bytes_after


def test_static_scales_freeze_after_calib_steps_calls(tmp_path):
    model = ExpertShapedPolicy()
    quantize_model(model, cfg(tmp_path, calib_steps=3))
    layer = model.get_submodule(f"{EXPERT}0.self_attn.q_proj")
    for i in range(5):
        model(torch.randn(1, 4, 8) * (1 + 10 * i))
        assert layer.observer.calls == min(i + 1, 3)
    assert layer.calibrated
    frozen = layer.act_scale.clone()
    model(torch.randn(1, 4, 8) * 1000)
    assert torch.equal(layer.act_scale, frozen)


def test_calibration_context_observes_every_call_then_freezes(tmp_path):
    model = ExpertShapedPolicy()
    quantize_model(model, cfg(tmp_path, calib_steps=1))
    layer = model.get_submodule(f"{EXPERT}1.mlp.down_proj")
    with calibration(model) as layers:
        assert len(layers) == 14
        for _ in range(4):
            model(torch.randn(1, 4, 8))
        assert layer.observer.calls == 4 and not layer.calibrated
    assert layer.calibrated and not layer.calibrating


def test_dynamic_activations_have_no_calibration_state(tmp_path):
    model = ExpertShapedPolicy()
    quantize_model(model, cfg(tmp_path, act_dynamic=True))
    layer = model.get_submodule(f"{EXPERT}0.self_attn.q_proj")
    model(torch.randn(1, 4, 8))
    assert layer.observer.calls == 0 and not layer.calibrated


def test_state_dict_round_trip_keeps_calibrated_scales(tmp_path):
    model = ExpertShapedPolicy()
    quantize_model(model, cfg(tmp_path, calib_steps=1))
    x = torch.randn(1, 4, 8)
    y = model(x)
    state = model.state_dict()
    assert any(k.endswith("act_scale") for k in state)
    clone = ExpertShapedPolicy()
    quantize_model(clone, cfg(tmp_path, calib_steps=1))
    clone.load_state_dict(state)
    assert torch.equal(clone(x), y)


def test_packs_do_not_depend_on_the_thread_count(tmp_path, monkeypatch):
    """Packs are built by independent single-threaded workers: 1 worker or several give the same layers."""
    import pytest_duquant.quantize as q

    base = ExpertShapedPolicy(depth=3)
    models = {}
    for workers in (1, 3):
        monkeypatch.setattr(q, "pack_workers", lambda w=workers: w)
        models[workers] = copy.deepcopy(base)
        quantize_model(models[workers], cfg(tmp_path / f"w{workers}", preset="A"))
    one, three = (dict(models[w].named_buffers()) for w in (1, 3))
    assert one.keys() == three.keys() and all(torch.equal(one[k], three[k]) for k in one if one[k] is not None)
    threads = torch.get_num_threads()
    monkeypatch.setattr(q, "pack_workers", lambda: 2)
    quantize_model(copy.deepcopy(base), cfg(tmp_path / "again", preset="B"))
    assert torch.get_num_threads() == threads  # given back
