"""Fixtures of the LIBERO golden suite: the run's options, read from the plugin's command-line options.

Options (registered by the plugin): --ckpt (default: the shipped reference policy), --duquant-preset,
--duquant-update-golden, --libero-suite (comma-separated; default libero_spatial with --ckpt, libero_object,
the reference policy's golden, without), --libero-tasks (default all), --libero-trials (default 50),
--libero-workers (default min(8, cores - 1)), --libero-backend (local|ray), --libero-results (default
./libero_results). Goldens: the plugin's duquant_success_regression (golden/libero/<fingerprint>/<suite>.json).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

DEFAULT_SUITE = "libero_spatial"
REFERENCE_SUITE = "libero_object"
DEFAULT_TRIALS = 50
DEFAULT_RESULTS = "libero_results"


def _opt(config, name, default=None):
    try:
        value = config.getoption(name)
    except ValueError:  # option not registered (plugin not loaded)
        return default
    return default if value is None else value


def pytest_generate_tests(metafunc):
    if "libero_suite" in metafunc.fixturenames:
        # Without --ckpt the suite runs the shipped reference policy, whose golden is libero_object.
        default = DEFAULT_SUITE if _opt(metafunc.config, "--ckpt") else REFERENCE_SUITE
        suites = [s.strip() for s in str(_opt(metafunc.config, "--libero-suite", default)).split(",") if s.strip()]
        metafunc.parametrize("libero_suite", suites)


@pytest.fixture(scope="session")
def libero_ckpt(duquant_ckpt):
    """--ckpt, else the reference policy shipped with the package (pytest_duquant.policies.reference)."""
    if duquant_ckpt is not None:
        return duquant_ckpt
    from pytest_duquant.policies.reference import reference_checkpoint

    return reference_checkpoint()


@dataclass(frozen=True)
class LiberoRunOptions:
    tasks: str | None
    trials: int
    workers: int
    backend: str
    results_dir: Path
    tokenizer: str | None
    policy_backend: str
    calibration: str | None


@pytest.fixture(scope="session")
def libero_options(request) -> LiberoRunOptions:
    c = request.config
    workers = _opt(c, "--libero-workers") or max(1, min(8, (os.cpu_count() or 2) - 1))
    return LiberoRunOptions(
        tasks=_opt(c, "--libero-tasks"),
        trials=int(_opt(c, "--libero-trials", DEFAULT_TRIALS)),
        workers=int(workers),
        backend=_opt(c, "--libero-backend", "local"),
        results_dir=Path(_opt(c, "--libero-results", DEFAULT_RESULTS)).expanduser(),
        tokenizer=_opt(c, "--tokenizer"),
        policy_backend=_opt(c, "--policy-backend", "builtin"),
        calibration=_opt(c, "--duquant-calib"),
    )
