"""The rollout harness with a stand-in env (no simulator): batching, pairing, errors, resume after kill -9,
videos, and the Ray backend. The real simulator is exercised in test_sim.py."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from pytest_duquant.libero import ConstantPolicy, SeededRandomPolicy, run_rollouts
from pytest_duquant.libero.fake_env import FakeLiberoEnv
from pytest_duquant.libero.harness import RolloutError
from pytest_duquant.libero.protocol import noise_seed
from pytest_duquant.results import EpisodeKey, read_results

PUSH = (1, 0, 0, 0, 0, 0, -1)  # moves the fake end effector +x: task t succeeds after 5*(1 + t%3) steps


class Recording:
    """Wraps a policy; keeps every observation's noise seed and each batch's size."""

    def __init__(self, inner):
        self.inner = inner
        self.seeds: list[int] = []
        self.batches: list[int] = []
        self.prompts: set[str] = set()
        self.fingerprint, self.preset = "fp-test", "B"

    def infer_batch(self, observations, noise_seeds):
        self.seeds += list(noise_seeds)
        self.batches.append(len(observations))
        for o in observations:
            assert o["observation/image"].shape == (224, 224, 3) and o["observation/state"].shape == (8,)
            self.prompts.add(o["prompt"])
        return self.inner.infer_batch(observations, noise_seeds)


def fake(**kw):
    return functools.partial(FakeLiberoEnv, **kw)


def test_episodes_follow_the_protocol_and_are_recorded(tmp_path):
    pol = Recording(ConstantPolicy(PUSH))
    out = tmp_path / "r.jsonl"
    s = run_rollouts(
        pol,
        "libero_spatial",
        tasks=[0, 1, 2],
        trials=2,
        seed=7,
        workers=1,
        results_path=out,
        env_factory=fake(),
        progress=False,
    )
    recs = {(r["task_id"], r["trial"]): r for r in read_results(out)}
    assert len(recs) == 6 and s.new == 6 and s.successes == 6
    for (task, _trial), r in recs.items():
        # 10 wait steps, then 5*(1 + task%3) pushes until done; queries every 5 actions
        assert r["steps"] == 10 + 5 * (1 + task % 3)
        assert r["queries"] == 1 + task % 3
        assert (r["fingerprint"], r["preset"], r["protocol"], r["error"]) == (
            "fp-test",
            "B",
            "openpi-libero-v1",
            None,
        )
        assert r["instruction"] == f"fake task {task} of libero_spatial"
    assert pol.prompts == {f"fake task {t} of libero_spatial" for t in range(3)}


def test_failures_run_to_the_step_budget(tmp_path):
    out = tmp_path / "r.jsonl"
    s = run_rollouts(
        ConstantPolicy(),
        "libero_object",
        tasks=[4],
        trials=[3],
        workers=1,
        results_path=out,
        env_factory=fake(),
        progress=False,
    )
    (r,) = s.records
    assert (r["success"], r["steps"], r["queries"], r["max_steps"]) == (False, 280 + 10, 56, 280)


def test_policy_calls_are_batched_across_workers(tmp_path):
    pol = Recording(ConstantPolicy((0.2, 0, 0, 0, 0, 0, -1)))
    s = run_rollouts(
        pol,
        "libero_spatial",
        tasks=[0, 1, 2],
        trials=2,
        workers=3,
        results_path=tmp_path / "r.jsonl",
        env_factory=fake(step_s=0.002),
        progress=False,
        batch_wait_s=1.0,
    )
    assert s.complete and max(pol.batches) == 3
    assert sum(pol.batches) == sum(r["queries"] for r in s.records)
    assert s.policy_calls == len(pol.batches) < sum(pol.batches)


def test_noise_is_seeded_per_episode_and_query_so_runs_pair(tmp_path):
    runs = []
    for workers in (1, 3):
        pol = Recording(SeededRandomPolicy(scale=0.5))
        s = run_rollouts(
            pol,
            "libero_goal",
            tasks=[0, 1],
            trials=3,
            seed=11,
            workers=workers,
            results_path=tmp_path / f"r{workers}.jsonl",
            env_factory=fake(),
            progress=False,
        )
        expected = [
            noise_seed(11, "libero_goal", r["task_id"], r["trial"], q)
            for r in s.records
            for q in range(r["queries"])
        ]
        assert sorted(pol.seeds) == sorted(expected) and len(set(expected)) == len(expected)
        runs.append({EpisodeKey.of(r): (r["success"], r["steps"]) for r in s.records})
    assert runs[0] == runs[1]  # same episodes, same noise: same outcomes, whatever the batching
    outcomes = {v[0] for v in runs[0].values()}
    assert outcomes == {True, False}, "the check needs both outcomes to mean anything"


def test_a_simulator_exception_ends_the_episode_as_a_failure(tmp_path):
    s = run_rollouts(
        ConstantPolicy(PUSH),
        "libero_spatial",
        tasks=[2],
        trials=[0, 1, 2],
        workers=1,
        results_path=tmp_path / "r.jsonl",
        env_factory=fake(error_trials=(1,), error_at_step=12),
        progress=False,
    )
    by_trial = {r["trial"]: r for r in s.records}
    assert by_trial[1]["success"] is False
    assert by_trial[1]["error"] == "RuntimeError: fake simulator error at step 12"
    assert by_trial[1]["steps"] == 11
    assert by_trial[0]["success"] and by_trial[2]["success"] and by_trial[2]["error"] is None


def test_a_policy_exception_aborts_the_run_and_records_nothing_for_it(tmp_path):
    class Broken(ConstantPolicy):
        def infer_batch(self, observations, noise_seeds):
            raise RuntimeError("CUDA out of memory")

    out = tmp_path / "r.jsonl"
    with pytest.raises(RolloutError, match="infer_batch failed.*CUDA out of memory"):
        run_rollouts(
            Broken(),
            "libero_spatial",
            tasks=[0],
            trials=2,
            workers=2,
            results_path=out,
            env_factory=fake(),
            progress=False,
        )
    assert read_results(out) == []

    class Short(ConstantPolicy):
        def infer_batch(self, observations, noise_seeds):
            return np.zeros((len(observations), 3, 7))

    with pytest.raises(RolloutError, match=r"shape \(1, 3, 7\).*horizon>=5"):
        run_rollouts(
            Short(),
            "libero_spatial",
            tasks=[0],
            trials=1,
            workers=1,
            results_path=out,
            env_factory=fake(),
            progress=False,
        )


def test_rerun_resumes_without_loading_the_policy(tmp_path):
    out = tmp_path / "r.jsonl"
    run_rollouts(
        ConstantPolicy(PUSH),
        "libero_spatial",
        tasks=[0],
        trials=2,
        workers=1,
        results_path=out,
        env_factory=fake(),
        progress=False,
    )
    calls = []

    def factory():
        calls.append(1)
        return ConstantPolicy(PUSH)

    s = run_rollouts(
        factory,
        "libero_spatial",
        tasks=[0],
        trials=2,
        workers=1,
        results_path=out,
        env_factory=fake(),
        progress=False,
        fingerprint="constant-policy",
        preset="none",
    )
    assert (s.new, len(s.records), calls) == (0, 2, [])
    s = run_rollouts(
        factory,
        "libero_spatial",
        tasks=[0],
        trials=3,
        workers=1,
        results_path=out,
        env_factory=fake(),
        progress=False,
        fingerprint="constant-policy",
        preset="none",
    )
    assert (s.new, len(s.records), calls) == (1, 3, [1])


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="task 10 out of range for libero_spatial"):
        run_rollouts(ConstantPolicy(), "libero_spatial", tasks=[10], results_path=tmp_path / "r.jsonl")
    with pytest.raises(ValueError, match="trial 50 out of range 0..49"):
        run_rollouts(
            ConstantPolicy(), "libero_spatial", tasks=[0], trials=51, results_path=tmp_path / "r.jsonl"
        )
    with pytest.raises(ValueError, match="backend='dask'"):
        run_rollouts(ConstantPolicy(), "libero_spatial", backend="dask", results_path=tmp_path / "r.jsonl")


_KILL_SCRIPT = textwrap.dedent("""
    import functools, sys
    from pytest_duquant.libero import ConstantPolicy, run_rollouts
    from pytest_duquant.libero.fake_env import FakeLiberoEnv
    if __name__ == "__main__":
        env = functools.partial(FakeLiberoEnv, step_s=float(sys.argv[2]), error_trials=(3,))
        run_rollouts(ConstantPolicy((1, 0, 0, 0, 0, 0, -1)), "libero_spatial", tasks=[0, 1, 2], trials=4,
                     seed=7, workers=2, results_path=sys.argv[1], progress=False, env_factory=env)
""")


def _complete_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_resume_after_kill_9_loses_and_repeats_nothing(tmp_path):
    out = tmp_path / "r.jsonl"
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.05"], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _complete_lines(out) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    before = out.read_bytes()
    n_before = before.count(b"\n")
    assert 2 <= n_before < 12, n_before
    finished = [json.loads(x) for x in before.splitlines()]
    # the orphaned workers see their pipe close and exit
    for pid in {r["worker_pid"] for r in finished}:
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"worker {pid} outlived its killed parent")
    out.write_bytes(before + b'{"suite": "libero_spatial", "task_id": 2, "tr')  # a kill mid-write, too

    s = run_rollouts(
        ConstantPolicy((1, 0, 0, 0, 0, 0, -1)),
        "libero_spatial",
        tasks=[0, 1, 2],
        trials=4,
        seed=7,
        workers=2,
        results_path=out,
        progress=False,
        env_factory=functools.partial(FakeLiberoEnv, error_trials=(3,)),
    )
    after = out.read_bytes()
    assert after.startswith(before)  # finished episodes untouched, byte for byte
    keys = [EpisodeKey.of(r) for r in read_results(out)]
    expected = {EpisodeKey("libero_spatial", t, k, 7) for t in range(3) for k in range(4)}
    assert sorted(keys) == sorted(expected) and len(keys) == 12  # each exactly once
    assert s.new == 12 - n_before and s.complete
    assert sum(not r["success"] for r in s.records) == 3  # trial 3 of each task hits the fake error


def test_failed_episodes_are_saved_as_mp4(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    vids = tmp_path / "videos"
    s = run_rollouts(
        ConstantPolicy(PUSH),
        "libero_spatial",
        tasks=[0],
        trials=[0, 1],
        workers=1,
        results_path=tmp_path / "r.jsonl",
        env_factory=fake(error_trials=(1,), error_at_step=12, resolution=64),
        video_dir=vids,
        progress=False,
    )
    ok, bad = sorted(s.records, key=lambda r: r["trial"])
    assert ok["video"] is None and bad["video"] is not None
    assert sorted(p.name for p in vids.iterdir()) == ["libero_spatial_task00_trial01_seed7_failure.mp4"]
    frames = imageio.mimread(bad["video"])
    assert len(frames) == bad["steps"] == 11 and frames[0].shape[:2] == (64, 64)


def test_ray_backend_runs_the_same_episodes(tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install -c constraints.txt ray)")
    kw = dict(
        tasks=[0, 1], trials=3, seed=7, progress=False, env_factory=fake(step_s=0.001, error_trials=(2,))
    )
    local = run_rollouts(
        SeededRandomPolicy(), "libero_spatial", workers=1, results_path=tmp_path / "l.jsonl", **kw
    )
    ray_run = run_rollouts(
        SeededRandomPolicy(),
        "libero_spatial",
        workers=2,
        results_path=tmp_path / "r.jsonl",
        backend="ray",
        ray_address="local",
        **kw,
    )
    pick = lambda s: {EpisodeKey.of(r): (r["success"], r["steps"], r["error"]) for r in s.records}
    assert pick(ray_run) == pick(local) and len(pick(local)) == 6
    assert ray_run.backend == "ray" and ray_run.workers == 2
    pids = {r["worker_pid"] for r in ray_run.records}
    assert os.getpid() not in pids and len(pids) == 2  # two actors, each its own process
