"""Demonstrations: job plan, on-disk format, manifest, resume (fake env + a scripted stand-in for the expert)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from pytest_duquant.libero import demos
from pytest_duquant.libero.fake_env import FakeLiberoEnv
from pytest_duquant.libero.protocol import DUMMY_ACTION


def test_plan_clean_repeat_first_then_noisy():
    jobs = demos.plan_jobs("libero_object", [0, 1], [3, 4], repeats=2, noise=0.1)
    assert len(jobs) == 8
    assert {j.action_noise for j in jobs if j.repeat == 0} == {0.0}
    assert {j.action_noise for j in jobs if j.repeat == 1} == {0.1}
    assert len({j.noise_seed for j in jobs}) == 8  # every episode its own noise
    assert jobs[0].file == "libero_object/task00_trial03_r0.npz"
    with pytest.raises(ValueError, match="unknown LIBERO suite"):
        demos.plan_jobs("libero_objects", [0], [0])


def test_chunks_take_tasks_in_turn_clean_first():
    jobs = demos.plan_jobs("libero_object", [0, 1, 2], range(4), repeats=2, noise=0.1)
    chunks = list(demos._chunks(jobs, 2))
    assert [c[0].task_id for c in chunks[:3]] == [0, 1, 2]  # a deadline leaves every task covered
    assert all(len({j.task_id for j in c}) == 1 for c in chunks)  # one env build per chunk
    first_round = [j for c in chunks[:6] for j in c]
    assert {j.repeat for j in first_round} == {0}  # all clean episodes come before any noisy one
    assert sorted(j.key for c in chunks for j in c) == sorted(j.key for j in jobs)


CALLS = []


def _fake_expert(env, init_state, seed=7, *, max_steps, num_steps_wait=10, action_noise=0.0, noise_seed=0,
                 on_step=None, expert=None):
    """Moves +x until the fake task succeeds; fails on init state 1 (no motion)."""
    CALLS.append(int(round(init_state[1] / 0.001)))
    env.seed(seed)
    env.reset()
    obs = env.set_init_state(init_state)
    rng = np.random.default_rng(noise_seed)
    t, done = 0, False
    while t < num_steps_wait:
        obs, _r, done, _i = env.step(list(DUMMY_ACTION))
        t += 1
    stuck = int(round(init_state[1] / 0.001)) == 1
    while not done and t < max_steps + num_steps_wait:
        label = np.array([0.0 if stuck else 1.0, 0, 0, 0, 0, 0, -1.0])
        executed = label.copy()
        executed[:6] += action_noise * rng.normal(size=6)
        on_step(obs, label, executed, t)
        obs, _r, done, _i = env.step(executed.tolist())
        t += 1
    return {"success": bool(done), "steps": t, "error": None}


def test_collect_writes_the_documented_format_and_resumes(tmp_path, monkeypatch):
    from pytest_duquant.libero import expert

    monkeypatch.setattr(expert, "run_expert_episode", _fake_expert)
    CALLS.clear()
    jobs = demos.plan_jobs("libero_object", [0], [0, 1], repeats=2, noise=0.05)
    factory = functools.partial(FakeLiberoEnv)
    recs = demos.collect_demos(jobs, tmp_path, workers=1, progress=False, env_factory=factory)
    assert len(recs) == 4 and sorted(CALLS) == [0, 0, 1, 1]
    ok = [r for r in recs if r["success"]]
    assert {r["trial"] for r in ok} == {0}  # init state 1 never succeeds: recorded, no file
    assert all(r["file"] is None for r in recs if not r["success"])
    files = demos.demo_files(tmp_path)
    assert [f.name for f in files] == ["task00_trial00_r0.npz", "task00_trial00_r1.npz"]
    d = demos.load_demo(files[1])
    t = len(d)
    assert t == ok[1]["frames"] > 0
    assert d.image.shape == (t, 224, 224, 3) and d.image.dtype == np.uint8  # 256 render -> 224 with pad
    assert d.wrist_image.shape == (t, 224, 224, 3)
    assert d.state.shape == (t, 8) and d.state.dtype == np.float32
    assert d.actions.shape == (t, 7) and np.all(d.actions[:, 0] == 1.0)  # the clean labels
    with np.load(files[1]) as z:
        assert not np.allclose(z["executed"], z["actions"])  # repeat 1: noise on what was executed
        assert z["step"][0] == 10  # recorded from the first step after the 10 wait steps
    assert d.prompt == "fake task 0 of libero_object" and d.meta["expert_version"] == expert.EXPERT_VERSION
    manifest = (tmp_path / demos.MANIFEST).read_text().splitlines()
    assert [json.loads(line)["format"] for line in manifest] == [demos.FORMAT] * 4
    # rerun: every recorded episode is skipped (resume), nothing is appended
    CALLS.clear()
    again = demos.collect_demos(jobs, tmp_path, workers=1, progress=False, env_factory=factory)
    assert CALLS == [] and len(again) == 4
    # a half-written last line (a killed run) is ignored, not fatal
    with open(tmp_path / demos.MANIFEST, "a") as f:
        f.write('{"suite": "libero_obj')
    assert len(demos.read_manifest(tmp_path)) == 4
    assert demos.demo_files(tmp_path, trials=[1]) == []
