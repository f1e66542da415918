"""pytest plugin: options, markers, fixtures and the terminal summary. Nothing else lives here."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from pytest_duquant.config import PRESET_NAMES, DuQuantConfig, DuQuantConfigError, from_env, replace

_CONFIG_KEY = pytest.StashKey[DuQuantConfig]()
MARKERS = {
    "libero": "golden LIBERO rollouts of the quantized policy (-m libero; --ckpt, else the reference policy)",
    "gpu": "needs a CUDA GPU (kernels, benchmarks); skipped with the reason elsewhere",
    "slow": "takes more than a few seconds",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("duquant", "DuQuant quantization regression")
    group.addoption("--duquant-preset", default=None, metavar="NAME",
                    help=f"DuQuant preset: {', '.join(PRESET_NAMES)} (beats OPENPI_DUQUANT_PRESET; variables beat it)")
    group.addoption("--ckpt", default=None, metavar="DIR", help="pi0.5 checkpoint directory (openpi or lerobot layout)")
    group.addoption("--policy-backend", default="builtin", choices=("builtin", "openpi"),
                    help="load --ckpt with our pi0.5 (builtin) or openpi's own loader")
    group.addoption("--tokenizer", default=None, metavar="PATH", help="PaliGemma SentencePiece tokenizer model")
    group.addoption("--duquant-update-golden", action="store_true", default=False,
                    help="rewrite golden files from this run (explicit; prints what changed)")
    group.addoption("--duquant-allowed-drop", default=None, type=float, metavar="DROP",
                    help="LIBERO gate: allowed success-rate drop (0.05 = 5 points), instead of the golden's "
                         "value for the preset")
    group.addoption("--duquant-same-machine", action="store_true", default=False,
                    help="LIBERO gate: also roll out the FP policy on the same episodes and judge against it "
                         "(the golden then checks the FP arm for drift)")
    group.addoption("--duquant-golden-presets", default=None, metavar="all|P1,P2",
                    help="check the model goldens under each of these presets (`all`: A, B, precision, speed) "
                    "instead of only the session's preset; the rest of the run keeps --duquant-preset")
    group.addoption("--duquant-calib", default=None, metavar="SOURCE",
                    help="calibration observations: synthetic (default), libero:<suite> (real resets) or FILE.npz")
    group.addoption("--duquant-report", default=None, metavar="DIR", help="write the report (PNG + JSON) here")
    group.addoption("--libero-suite", default=None, metavar="SUITE",
                    help="LIBERO suite(s), comma-separated (default libero_spatial)")
    group.addoption("--libero-tasks", default=None, metavar="IDS", help="task ids, e.g. 0,1,2 or 0-4 (default all)")
    group.addoption("--libero-trials", default=None, type=int, metavar="N", help="trials per task")
    group.addoption("--libero-workers", default=None, type=int, metavar="N", help="parallel env workers")
    group.addoption("--libero-backend", default="local", choices=("local", "ray"), help="episode scheduler")
    group.addoption("--libero-results", default=None, metavar="DIR", help="where rollout JSONL files go")
    parser.addini("duquant_preset", "default DuQuant preset", default=None)
    parser.addini("duquant_ckpt", "default pi0.5 checkpoint directory", default=None)
    parser.addini("duquant_report", "default report directory", default=None)


_REROOT_KEY = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, args: list[str], parser: pytest.Parser) -> None:
    """`--ckpt DIR` (space form): keep the project's rootdir and pyproject settings (pytest_duquant.rootdir)."""
    from pytest_duquant.rootdir import reroot

    note = reroot(early_config, args)
    if note:
        early_config.stash[_REROOT_KEY] = note


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    preset = config.getoption("--duquant-preset") or config.getini("duquant_preset") or None
    try:
        config.stash[_CONFIG_KEY] = from_env(os.environ, preset=preset)
    except DuQuantConfigError as exc:
        raise pytest.UsageError(f"DuQuant configuration: {exc}") from None
    ckpt = _ckpt_option(config)
    if ckpt is not None and not ckpt.is_dir():
        raise pytest.UsageError(f"--ckpt {ckpt}: no such checkpoint directory")
    if not hasattr(config, "workerinput"):
        from pytest_duquant import progress

        config.stash[_PROGRESS_KEY] = progress.report_to(_terminal_writer(config))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _PROGRESS_KEY in config.stash:
        from pytest_duquant import progress

        progress.report_to(config.stash[_PROGRESS_KEY])


_PROGRESS_KEY = pytest.StashKey[object]()


def _terminal_writer(config: pytest.Config):
    """Progress lines of long phases (loading, quantizing, calibrating) on the terminal, past output capture."""

    def write(line: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        capman = config.pluginmanager.get_plugin("capturemanager")
        ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
        with ctx:
            reporter.write_line(line)

    return write


def _ckpt_option(config: pytest.Config) -> Path | None:
    value = config.getoption("--ckpt") or config.getini("duquant_ckpt") or None
    return None if value is None else Path(value).expanduser()


def session_config(config: pytest.Config) -> DuQuantConfig:
    return config.stash[_CONFIG_KEY]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("-m") or ""
    cuda = _cuda_reason()
    for item in items:
        if item.get_closest_marker("libero") and "libero" not in markexpr:
            reason = "LIBERO golden rollouts run only when selected: -m libero [--ckpt DIR]"
            item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("gpu") and cuda:
            item.add_marker(pytest.mark.skip(reason=cuda))


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "needs torch with CUDA (torch is not installed)"
    if not torch.cuda.is_available():
        return f"needs a CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return None


_REPORT_KEY = pytest.StashKey[dict]()
_MEASURED_KEY = pytest.StashKey[list]()
_GOLDEN_CHECKS_KEY = pytest.StashKey[list]()


def pytest_sessionfinish(session: pytest.Session, exitstatus) -> None:
    """--duquant-report DIR: draw what the session measured (else measure the session preset) and, with
    rollout results under --libero-results, the success figure."""
    config = session.config
    out = config.getoption("--duquant-report") or config.getini("duquant_report")
    if not out or hasattr(config, "workerinput"):
        return
    try:
        config.stash[_REPORT_KEY] = {"paths": {k: str(v) for k, v in _write_report(config, Path(out)).items()}}
    except Exception as exc:  # noqa: BLE001 - the run's outcome stands; say why the report is missing
        config.stash[_REPORT_KEY] = {"error": f"{type(exc).__name__}: {exc}"}


def _write_report(config: pytest.Config, out: Path) -> dict[str, Path]:
    from pytest_duquant.golden.common import default_root
    from pytest_duquant.golden.episodes import goldens_for
    from pytest_duquant.metrics.probe import measure_policy, preset_configs
    from pytest_duquant.policies.session import policy_factory
    from pytest_duquant.reporting.model import write_model_report
    from pytest_duquant.reporting.success import write_success_report
    from pytest_duquant.results import read_results

    cfg = session_config(config)
    metrics = [m for measured in config.stash.get(_MEASURED_KEY, []) for m in measured.all()]
    if not metrics and cfg.enabled:
        make = policy_factory(_ckpt_option(config), tokenizer=config.getoption("--tokenizer"),
                              backend=config.getoption("--policy-backend"))
        metrics = measure_policy(make, preset_configs([cfg.preset], base=cfg))
    paths = dict(write_model_report(metrics, out, focus=cfg.preset)) if metrics else {}
    results_dir = Path(config.getoption("--libero-results") or "libero_results")
    files = sorted(results_dir.rglob("*.jsonl")) if results_dir.is_dir() else []
    records = [r for f in files for r in read_results(f)]
    succ = write_success_report(records, goldens_for(records, default_root(config.rootpath)), out)
    paths.update({f"success_{k}": v for k, v in (succ or {}).items()})
    return paths


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"duquant: {session_config(config).describe()}"]
    if _REROOT_KEY in config.stash:
        lines.append(f"duquant: {config.stash[_REROOT_KEY]}")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    cfg = session_config(config)
    tr = terminalreporter
    tr.section("DuQuant configuration in force")
    if not cfg.enabled:
        tr.write_line("preset fp: no quantization (the FP baseline)")
        return
    tr.write_line(f"preset {cfg.preset}; precedence: option > OPENPI_DUQUANT_* > preset > defaults")
    if config.getoption("--duquant-update-golden") and "libero" in (config.getoption("-m") or ""):
        tr.write_line("LIBERO goldens were recorded from FP runs (nothing quantized; results labelled fp); "
                      f"preset {cfg.preset} applied only to model goldens")
    for env, value, source in cfg.summary_items():
        origin = {"default": "default", "preset": f"preset {cfg.preset}", "env": "environment",
                  "override": "option"}[source]
        tr.write_line(f"  {env:<20} = {value:<40} [{origin}]")
    ckpt = _ckpt_option(config)
    tr.write_line(f"checkpoint: {ckpt if ckpt else 'built-in dummy pi0.5 (random init)'}")
    updates = [m for check in config.stash.get(_GOLDEN_CHECKS_KEY, []) for m in check.messages]
    if updates:
        tr.section("DuQuant goldens written (--duquant-update-golden)")
        for message in updates:
            tr.write_line(message)
    report = config.stash.get(_REPORT_KEY, None)
    if report is not None:
        if "error" in report:
            tr.write_line(f"report NOT written: {report['error']}", red=True)
        for kind, path in report.get("paths", {}).items():
            tr.write_line(f"report {kind}: {path}")


# ---- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def duquant_config(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DuQuantConfig:
    """The session's DuQuantConfig. Packs go to a temporary folder unless OPENPI_DUQUANT_PACKDIR is set."""
    cfg = session_config(request.config)
    if cfg.source_of("packdir") == "default":
        cfg = replace(cfg, packdir=str(tmp_path_factory.mktemp("duquant_packed")))
    return cfg


@pytest.fixture(scope="session")
def duquant_ckpt(request: pytest.FixtureRequest) -> Path | None:
    """The --ckpt directory, or None."""
    return _ckpt_option(request.config)


@pytest.fixture(scope="session")
def duquant_update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--duquant-update-golden"))


@pytest.fixture(scope="session")
def duquant_golden_root(request: pytest.FixtureRequest) -> Path:
    """The project's golden/ folder (the nearest one above the rootdir holding model/ or libero/)."""
    from pytest_duquant.golden.common import default_root

    return default_root(request.config.rootpath)


@pytest.fixture(scope="session")
def duquant_model_regression(request: pytest.FixtureRequest, duquant_golden_root, duquant_update_golden):
    """ModelRegression: check(metrics, name) against golden/model/<fingerprint>/<name>.json (or rewrite it)."""
    from pytest_duquant.golden.model import ModelRegression

    command = " ".join(["pytest", *request.config.invocation_params.args])
    return _remember(request, _GOLDEN_CHECKS_KEY,
                     ModelRegression(duquant_golden_root, update=duquant_update_golden, command=command))


@pytest.fixture(scope="session")
def duquant_success_regression(request: pytest.FixtureRequest, duquant_golden_root, duquant_update_golden):
    """SuccessRegression: check(records, suite, ...) judged by pytest_duquant.judge (the `duquant gate` call)."""
    from functools import partial

    from pytest_duquant.golden.episodes import SuccessRegression
    from pytest_duquant.judge import judge

    drop = request.config.getoption("--duquant-allowed-drop")
    return _remember(request, _GOLDEN_CHECKS_KEY, SuccessRegression(
        duquant_golden_root, update=duquant_update_golden, judge=partial(judge, allowed_drop=drop)))


@pytest.fixture(scope="session")
def duquant_measure_with(request: pytest.FixtureRequest):
    """Factory: probe -> Measurements (cached per settings; what it measures goes into --duquant-report)."""
    from pytest_duquant.metrics.probe import Measurements

    return lambda probe: _remember(request, _MEASURED_KEY, Measurements(probe))


@pytest.fixture(scope="session")
def duquant_measurements(duquant_policy_factory, duquant_measure_with):
    """Measurements of the session policy (PolicyProbe): measure(config, rtn=..., label=...) -> ModelMetrics."""
    import torch

    from pytest_duquant.metrics.probe import PolicyProbe

    policy = duquant_policy_factory()
    # A small checkpoint (the dummy) is measured in float64: its goldens then reproduce on any CPU (in float32
    # the action error's max abs moved by up to 13% with the CPU's float order). A full-size pi05 (26 GB in
    # float64) is measured in the precision it is served in; the golden records which (protocol "dtype").
    small = getattr(getattr(policy, "config", None), "variant", "") == "dummy"
    probe = PolicyProbe(policy, fingerprint=duquant_policy_factory.fingerprint,
                        dtype=torch.float64 if small else None)
    yield duquant_measure_with(probe)
    probe.close()


def _remember(request: pytest.FixtureRequest, key, obj):
    request.config.stash.setdefault(key, []).append(obj)
    return obj


@pytest.fixture
def quantize(duquant_config: DuQuantConfig):
    """Factory: quantize(module, **overrides) quantizes `module` in place under the session's config.

    Overrides are setting names (block=64, abits=0, ...). Returns the QuantReport.
    """
    from pytest_duquant.quantize import quantize_model

    def _quantize(module, **overrides):
        cfg = replace(duquant_config, **overrides) if overrides else duquant_config
        return quantize_model(module, cfg)

    return _quantize


@pytest.fixture(scope="session")
def duquant_policy_factory(request: pytest.FixtureRequest, duquant_ckpt: Path | None):
    """Factory returning a fresh FP policy: from --ckpt when given, else the built-in dummy pi0.5."""
    from pytest_duquant.policies.session import policy_factory

    return policy_factory(duquant_ckpt, tokenizer=request.config.getoption("--tokenizer"),
                          backend=request.config.getoption("--policy-backend"))


@pytest.fixture(scope="session")
def duquant_calibration_observations(request: pytest.FixtureRequest):
    """Calibration observations from --duquant-calib (None = the built-in synthetic ones)."""
    from pytest_duquant.libero.calibration import CalibrationSourceError, calibration_observations

    try:
        return calibration_observations(request.config.getoption("--duquant-calib"))
    except CalibrationSourceError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def quantized_model(duquant_policy_factory, duquant_config: DuQuantConfig, duquant_calibration_observations):
    """(policy, QuantReport): the session's policy quantized under the session's config and calibrated."""
    from pytest_duquant.policies.session import quantize_and_calibrate

    return quantize_and_calibrate(duquant_policy_factory(), duquant_config, duquant_calibration_observations)
