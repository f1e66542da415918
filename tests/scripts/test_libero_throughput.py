"""scripts/libero_throughput.py's run specs (docs/speed.md): N workers, or N/M with at most M per policy call."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "libero_throughput.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("libero_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("text,expected", [("14", (14, None)), ("14/7", (14, 7)), (" 1 ", (1, None)),
                                           ("14/", (14, None))])  # an empty M: no cap
def test_run_specs(script, text, expected):
    assert script._run_spec(text) == expected


@pytest.mark.parametrize("text", ["", "x", "0", "14/0", "3/a"])
def test_bad_run_specs_are_refused_by_name(script, text):
    with pytest.raises(ValueError, match="--workers"):
        script._run_spec(text)


def test_a_bad_worker_list_is_a_usage_error_not_a_traceback():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workers", "14/x"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--workers '14/x'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,says", [(["--batch-sizes", "8,x"], "--batch-sizes '8,x'"),
                                       (["--batch-sizes", "0"], "--batch-sizes '0'"),
                                       (["--torch-threads", "0"], "--torch-threads 0"),
                                       (["--device", "cpu", "--compile-prefix"], "compiles for a CUDA GPU")])
def test_bad_serving_options_are_a_usage_error_not_a_traceback(args, says):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr


def test_the_random_policy_is_built_in_memory_and_served_with_the_asked_sizes(script):
    """Without --ckpt: a random policy drawn on the device (no checkpoint written), served on the fast path with
    the command line's options (one padded size, short-query attention, fused projections + K/V buffer)."""
    import argparse

    args = argparse.Namespace(
        variant="dummy", device="cpu", dtype="float32", compile_step=False, compile_prefix=False, short_query=True,
        fuse=True, sizes=(8,))
    serve = script.serve_options(args)
    assert serve == {"compile_step": False, "compile_prefix": False, "short_query": True, "fuse": True,
                     "batch_sizes": (8,)}
    factory = script._random_factory(args, None, serve)
    assert factory.fingerprint == "random-dummy-device-seed0-float32" and factory.preset == "fp"
    policy = factory()
    assert policy.fast and policy.batch_sizes == (8,)
    assert set(policy.fast_options) == {"step_attn_fn", "kv_buffer"}
    assert policy.model.paligemma_with_expert.expert.layers[0].mlp.fused_projection() is not None
    policy.serve_fast()  # plain again: default sizes, no options, un-fused
    assert policy.batch_sizes == (1, 2, 4, 8, 16, 32) and policy.fast_options == {}
    assert policy.model.paligemma_with_expert.expert.layers[0].mlp.fused_projection() is None


def test_the_steady_rate_leaves_out_the_first_wave(script):
    """4 workers: the first wave ends at 20 s (start-up), then 8 more episodes in the next 8 s: 3600 an hour."""
    done = [19.0, 19.5, 20.0, 20.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0, 27.5, 28.0]
    assert script.steady_rate(done, 4) == pytest.approx(3600.0 * 8 / 8.0)
    assert script.steady_rate(list(reversed(done)), 4) == script.steady_rate(done, 4)  # order-free
    assert script.steady_rate(done[:7], 4) is None  # fewer than two waves: too short to tell
    assert script.steady_rate([5.0] * 8, 4) is None  # no time after the first wave


def test_bad_task_lists_are_a_usage_error_not_a_traceback():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--suite", "libero_object", "--tasks", "0-10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tasks" in proc.stderr and "out of range" in proc.stderr
    assert "Traceback" not in proc.stderr
