"""Model-level DuQuant regression suite on the session's pi0.5 policy (--ckpt, else the built-in dummy).

Under the session preset (`--duquant-preset`, variables): action-chunk error vs FP (relative L2, max abs,
every denoising step), per-layer SQNR of every quantized linear vs plain RTN, packed bytes, all compared
with golden/model/<fingerprint>/<preset>.json. Orderings (SPEC): `precision` <= `A`; DuQuant <= plain RTN
on the same layers; error falls as WBITS rises. docs/model-suite.md has the measured numbers.
"""

from __future__ import annotations

import pytest
import torch

from pytest_duquant.config import from_env, replace
from pytest_duquant.golden import model as golden_model
from pytest_duquant.numerics import quantizers


def _variant(config, rotation):
    return config if config.rotation == rotation else replace(config, rotation=rotation)


@pytest.mark.parametrize("rotation", ["config", "greedy"])
def test_model_metrics_match_the_golden(duquant_measurements, golden_preset, check_model_golden, rotation):
    """Every figure within tolerance of golden/model/<fingerprint>/<name>.json; the table of the worst
    layers otherwise. 'config' = the settings in force; 'greedy' = the same with ROTATION=greedy."""
    cfg = golden_preset if rotation == "config" else _variant(golden_preset, "greedy")
    if rotation == "greedy" and golden_preset.rotation == "greedy":
        pytest.skip("the settings in force already use ROTATION=greedy (covered by [config])")
    name = duquant_measurements.name(cfg)
    m = duquant_measurements(cfg, rtn=True, label=name)
    assert len(m.layers) > 0 and m.bytes_after < m.bytes_before
    check_model_golden(m, name)


@pytest.mark.parametrize("rotation", ["svd", "greedy"])
def test_duquant_beats_plain_rtn_on_the_same_layers(
    request, duquant_measurements, session_preset, duquant_golden_root, rotation
):
    """SPEC ordering: a DuQuant preset's per-layer error <= plain RTN at the same bits on the same layers
    (mean per-layer SQNR over the quantized linears, on their real calibration inputs).

    Greedy (the paper's rotation) is asserted outright. The SVD rotation (SPEC default) aligns with outlier
    channels instead of spreading them, so on some checkpoints/presets it is measurably *worse* than RTN:
    where the committed golden records that, this test is a strict xfail quoting the recorded numbers
    (an XPASS then says the relation changed and the golden/docs need a look)."""
    cfg = _variant(session_preset, rotation)
    name = duquant_measurements.name(cfg)
    m = duquant_measurements(cfg, rtn=True, label=name)
    rtn = m.mean_rtn_sqnr_db
    gain = m.mean_sqnr_db - rtn
    better = sum(1 for la in m.layers if la.gain_db > 0)
    if rotation == "svd":
        rec = golden_model.recorded_rtn_relation(duquant_golden_root, m, name)
        if rec is not None and rec[0] < rec[1]:
            request.node.add_marker(
                pytest.mark.xfail(
                    strict=True,
                    reason=(
                        f"measured and recorded in {rec[2]}: DuQuant-SVD mean SQNR {rec[0]:.2f} dB "
                        f"< plain RTN {rec[1]:.2f} dB ({rec[0] - rec[1]:+.2f} dB): "
                        "the SVD rotation does not beat RTN here"
                    ),
                )
            )
    act = "" if m.output_rtn is None else (f"; action rel L2 {m.output.rel_l2:.4f} vs RTN {m.output_rtn.rel_l2:.4f}")
    assert gain >= 0.0, (
        f"DuQuant-{rotation} ({cfg.preset}) mean per-layer SQNR {m.mean_sqnr_db:.2f} dB "
        f"< plain RTN {rtn:.2f} dB "
        f"({gain:+.2f} dB; {better}/{len(m.layers)} layers better){act}"
    )


def test_precision_error_is_at_most_preset_A_error(duquant_measurements):
    a = duquant_measurements(from_env({}, preset="A"))
    p = duquant_measurements(from_env({}, preset="precision"))
    assert p.output.rel_l2 <= a.output.rel_l2, (p.output.rel_l2, a.output.rel_l2)
    assert p.output.max_abs <= a.output.max_abs, (p.output.max_abs, a.output.max_abs)
    assert p.mean_sqnr_db >= a.mean_sqnr_db, (p.mean_sqnr_db, a.mean_sqnr_db)


def test_error_falls_as_weight_bits_rise(duquant_measurements):
    """Preset A with WBITS_DEFAULT 3, 4, 6, 8 (A8): strictly lower action error and higher SQNR each step."""
    base = from_env({}, preset="A")
    runs = [(b, duquant_measurements(replace(base, wbits_default=b))) for b in (3, 4, 6, 8)]
    errs = [(b, m.output.rel_l2, m.mean_sqnr_db) for b, m in runs]
    for (b0, e0, s0), (b1, e1, s1) in zip(errs, errs[1:], strict=False):
        assert e1 < e0, f"action error W{b1} {e1:.5f} is not below W{b0} {e0:.5f}: {errs}"
        assert s1 > s0, f"mean SQNR W{b1} {s1:.2f} dB is not above W{b0} {s0:.2f} dB: {errs}"


def test_error_is_measured_at_every_denoising_step(duquant_measurements, session_preset):
    m = duquant_measurements(session_preset)
    steps = duquant_measurements.probe.policy.config.num_steps
    assert len(m.output.per_step_rel_l2) == steps == len(m.output.per_step_max_abs)
    assert m.output.per_step_rel_l2[-1] == m.output.rel_l2
    assert all(e > 0 for e in m.output.per_step_rel_l2)  # quantization changes every step's output


def test_packed_bytes_are_those_of_int_codes_and_scales(duquant_measurements, session_preset):
    m = duquant_measurements(session_preset)
    fp = [duquant_measurements.probe._fp_modules[la.name] for la in m.layers]
    fp_bytes = sum(t.numel() * t.element_size() for mod in fp for t in (mod.weight, mod.bias) if t is not None)
    assert m.bytes_before == fp_bytes
    codes = sum((la.shape[0] * la.shape[1] * la.wbits + 7) // 8 for la in m.layers)
    scales = sum(2 * la.shape[0] for la in m.layers)
    assert m.bytes_after >= codes + scales  # at least the int codes and fp16 scales
    assert m.bytes_after < fp_bytes  # and smaller than the float weights
    assert m.info["peak_memory_bytes"] and m.info["peak_memory_bytes"] > 0


def _scale_search_inverted(weight, bits, grid=quantizers.MSE_GRID):
    """The classic flipped comparison: the scale search keeps the grid scale with the LARGEST error."""
    w = weight.detach().float()
    base = (w.abs().amax(dim=1) / quantizers.qmax(bits)).clamp_min(1e-8)
    errs = torch.stack([((quantizers.fake_quant_sym(w, (base / a)[:, None], bits) - w) ** 2).mean(1) for a in grid])
    scale = base / torch.tensor(grid)[errs.argmax(0)]
    return quantizers.quantize_codes(w, scale[:, None], bits).to(torch.int8), scale


def _codes_off_by_one(weight, bits, grid=quantizers.MSE_GRID):
    codes, scales = quantizers.quantize_weight_mse(weight, bits, grid)
    q = quantizers.qmax(bits)
    return (codes.to(scales.dtype) + 1).clamp(-q - 1, q).to(codes.dtype), scales


@pytest.mark.parametrize(
    "bug", [_scale_search_inverted, _codes_off_by_one], ids=["scale-search-picks-worst", "codes+1"]
)
def test_a_broken_weight_quantizer_fails_the_golden_with_the_worst_layers_table(
    monkeypatch, tmp_path, duquant_measurements, session_preset, bug
):
    """The comparison catches a real bug: the good run is the golden, the bugged run must fail it."""
    good = duquant_measurements(session_preset, rtn=True)
    golden = golden_model.to_golden(good, "good")
    monkeypatch.setattr("pytest_duquant.packs.quantize_weight_mse", bug)
    bad = duquant_measurements.probe.measure(replace(session_preset, packdir=str(tmp_path / "packs")), rtn=False)
    bad.output_rtn = good.output_rtn  # the baseline is not what is broken
    for la_bad, la_good in zip(bad.layers, good.layers, strict=True):
        la_bad.rtn_sqnr_db = la_good.rtn_sqnr_db
    cmp = golden_model.compare(golden, bad, "in-memory golden of the unbroken run")
    assert not cmp.ok
    report = cmp.report()
    assert "worst layers" in report and "<-- beyond tolerance" in report
    worst = cmp.worst(1)[0]
    assert worst.delta < -golden["tolerances"]["sqnr_db"]  # a real SQNR drop, listed first
    assert worst.name in report
    assert any(f.startswith("mean SQNR") for f in cmp.failures)
