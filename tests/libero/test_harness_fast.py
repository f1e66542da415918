"""LIBERO at GPU speed (issue 14): the harness's pi0.5 policies serve the fast path with padded batches, FP and
quantized alike (docs/speed.md). The padding's exactness is tested in tests/policies/test_fast.py."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("sentencepiece")

from pytest_duquant.libero import run_rollouts  # noqa: E402
from pytest_duquant.libero.fake_env import FakeLiberoEnv  # noqa: E402
from pytest_duquant.libero.policy import pi05_policy_factory  # noqa: E402
from pytest_duquant.libero.protocol import ProtocolSettings  # noqa: E402
from pytest_duquant.policies.pi05.modeling import Pi05Model  # noqa: E402
from pytest_duquant.policies.pi05.policy import BATCH_SIZES  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from pytest_duquant.policies import session

    return session.init_checkpoint(tmp_path_factory.mktemp("dummy_ckpt") / "ckpt", "dummy", seed=2)


@pytest.fixture
def calls(monkeypatch):
    """Batch sizes the model's fast call receives; the reference call must not run while serving."""
    seen: list[int] = []
    fast = Pi05Model.sample_actions_fast

    def spy_fast(self, *args, **kwargs):
        seen.append(int(kwargs["noise"].shape[0]))
        return fast(self, *args, **kwargs)

    monkeypatch.setattr(Pi05Model, "sample_actions_fast", spy_fast)
    return seen


@pytest.mark.parametrize("preset", ["fp", "B"])
def test_the_harness_serves_the_fast_padded_path(ckpt, calls, tmp_path, preset, monkeypatch):
    from pytest_duquant.config import from_env, replace

    config = None if preset == "fp" else replace(
        from_env({}, preset=preset), packdir=str(tmp_path / "packs"), calib_steps=2
    )
    factory = pi05_policy_factory(ckpt, config, device="cpu")
    made = []

    def make():
        policy = factory()
        made.append(policy)
        # serving starts here: the exact path must not be called any more
        monkeypatch.setattr(Pi05Model, "sample_actions", _refuse)
        return policy

    summary = run_rollouts(
        make, "libero_spatial", tasks=[0, 1, 2], trials=1, seed=7, workers=3, results_path=tmp_path / "r.jsonl",
        preset=preset, fingerprint="fp-test", env_factory=functools.partial(FakeLiberoEnv),
        protocol=ProtocolSettings(max_steps=20), progress=False, batch_wait_s=5.0,
    )
    (policy,) = made
    assert policy.fast and policy.batch_sizes == BATCH_SIZES
    assert policy.mode == ("cudagraph" if torch.cuda.is_available() else "eager")
    assert summary.complete and summary.policy_calls == len(calls) > 0
    assert all(n in BATCH_SIZES for n in calls), calls
    assert 3 in summary.batch_sizes and 4 in calls  # 3 workers' observations in one call, padded to 4
    quantized = [m for m in policy.model.modules() if hasattr(m, "calibrating")]
    assert bool(quantized) == (preset != "fp")


def _refuse(*args, **kwargs):
    raise AssertionError("the harness called the reference sample_actions while serving")


def test_the_exact_path_stays_available(ckpt):
    policy = pi05_policy_factory(ckpt, None, device="cpu", fast=False)()
    assert not policy.fast and policy.mode == "eager"


def test_named_servings_are_serve_fasts_options():
    """`duquant rollouts --serve`: "graphed" is serve_fast's defaults, "compiled" the H200's fastest measured
    options (docs/speed.md); a dict passes through; the names' options are copies (a caller cannot change them)."""
    from pytest_duquant.libero.policy import serving_options
    from pytest_duquant.policies.pi05.policy import SERVING

    assert serving_options("graphed", "cpu") == {} and serving_options(None, "cpu", fast=False) == {}
    compiled = serving_options("compiled", "cuda:0")
    assert compiled == {"compile_step": True, "compile_prefix": True, "batch_sizes": (8,), "short_query": True,
                        "fuse": True}
    compiled["fuse"] = False
    assert SERVING["compiled"]["fuse"] is True
    assert serving_options({"short_query": True}, "cpu") == {"short_query": True}
    with pytest.raises(ValueError, match="compiles for a CUDA GPU"):
        serving_options({"compile_step": True}, "cpu")


def test_a_named_serving_reaches_the_policy(ckpt):
    policy = pi05_policy_factory(ckpt, None, device="cpu", serve="graphed")()
    assert policy.fast and policy.batch_sizes == BATCH_SIZES and policy.fast_options == {}
