"""The scripted privileged-state LIBERO expert (pytest_duquant.libero.expert).

Pure geometry/control helpers run everywhere. The simulator tests (a few unrendered episodes on
LIBERO's ControlEnv, ~2-5 s each) need hf-libero + the asset packages and skip, with that reason,
where they are missing (as tests/libero/test_sim.py).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from pytest_duquant.libero import expert as X
from pytest_duquant.libero import sim_setup
from pytest_duquant.libero.protocol import MAX_STEPS


# ---- pure helpers ------------------------------------------------------------------------------------
def _rotvec_to_matrix(v):
    v = np.asarray(v, dtype=float)
    th = np.linalg.norm(v)
    if th < 1e-12:
        return np.eye(3)
    k = v / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * K @ K


@pytest.mark.parametrize("v", [[0.3, -0.2, 0.1], [0.0, 0.0, 2.5], [math.pi - 1e-4, 0, 0], [0.5, 0.5, -0.5]])
def test_axis_angle_inverts_rodrigues(v):
    np.testing.assert_allclose(X.axis_angle(_rotvec_to_matrix(v)), v, atol=1e-3)


def test_desired_rotation_points_down_and_fingers_follow_yaw():
    np.testing.assert_allclose(X.desired_rotation(0.0), X.R_DOWN)
    for yaw in (-1.2, 0.0, 0.4, 1.5):
        R = X.desired_rotation(yaw)
        np.testing.assert_allclose(R[:, 2], [0, 0, -1], atol=1e-12)  # approach axis down
        np.testing.assert_allclose(R[:, 0], [-math.sin(yaw), math.cos(yaw), 0], atol=1e-12)  # finger axis
        assert math.isclose(X.finger_axis_yaw(R), yaw, abs_tol=1e-9)
        assert np.linalg.det(R) == pytest.approx(1.0)


def test_footprint_of_a_rotated_box():
    half = np.array([0.04, 0.015, 0.05])
    R = X.rot_z(math.radians(30))
    pts = np.array([1.0, -2.0, 0.3]) + (X._BOX_SIGNS * half) @ R.T
    fp = X.footprint_of_points(pts)
    assert fp.width == pytest.approx(0.03, abs=1e-3) and fp.length == pytest.approx(0.08, abs=1e-3)
    # the narrow side is the box's local y, i.e. 30 + 90 degrees (modulo 180)
    assert abs(X.wrap_half(fp.yaw - math.radians(120))) < math.radians(1.5)
    np.testing.assert_allclose(fp.center, [1.0, -2.0], atol=1e-6)
    assert (fp.bottom, fp.top) == pytest.approx((0.25, 0.35))


def test_boxes_overlap_separating_axes():
    eye = np.eye(3)
    h = np.array([0.05, 0.05, 0.05])
    assert X.boxes_overlap(np.zeros(3), eye, h, np.array([0.09, 0, 0]), eye, h)
    assert not X.boxes_overlap(np.zeros(3), eye, h, np.array([0.11, 0, 0]), eye, h)
    # rotated 45 degrees: its corner reaches 0.0707 along x
    R = X.rot_z(math.pi / 4)
    assert X.boxes_overlap(np.zeros(3), eye, h, np.array([0.115, 0, 0]), R, h)
    assert not X.boxes_overlap(np.zeros(3), eye, h, np.array([0.125, 0, 0]), R, h)


def test_unsupported_goal_is_refused():
    fake = SimpleNamespace(parsed_problem={"goal_state": [["open", "wooden_cabinet_1_top_region"]]})
    with pytest.raises(NotImplementedError, match="one \\(in X Y\\) or \\(on X Y\\)"):
        X.ScriptedExpert(fake)
    with pytest.raises(TypeError, match="no LIBERO task env"):
        X.ScriptedExpert(SimpleNamespace(env=None))


# ---- the simulator -----------------------------------------------------------------------------------
def _require_libero(suite):
    try:
        sim_setup.libero_package_root()
        sim_setup.check_suite_assets(suite)
    except sim_setup.LiberoSetupError as exc:
        pytest.skip(f"LIBERO simulator not installed: {exc}")


def _control_env(suite, task_id):
    _require_libero(suite)
    sim_setup.prepare()
    from libero.libero import benchmark
    from libero.libero.envs.env_wrapper import ControlEnv

    bench = benchmark.get_benchmark_dict()[suite]()
    env = ControlEnv(
        bddl_file_name=bench.get_task_bddl_file_path(task_id), has_offscreen_renderer=False, use_camera_obs=False
    )
    return env, bench.get_task_init_states(task_id)


@pytest.fixture(scope="module")
def object_env():
    env, init_states = _control_env("libero_object", 0)  # alphabet soup -> basket
    yield env, init_states
    env.close()


def test_expert_solves_libero_object_task0(object_env):
    env, init_states = object_env
    labels = []
    r = X.run_expert_episode(
        env, init_states[0], max_steps=MAX_STEPS["libero_object"], on_step=lambda o, a, e, t: labels.append((t, a, e))
    )
    assert r["error"] is None, r["traceback"]
    assert r["success"], r
    assert env.check_success()  # LIBERO's own predicate agrees with `done`
    assert 10 < r["steps"] <= MAX_STEPS["libero_object"] + 10
    assert labels[0][0] == 10  # the expert starts after the 10 wait steps
    assert len(labels) == r["steps"] - 10
    for _t, label, executed in labels:  # no noise: what runs is the label, a valid OSC action
        assert label.shape == (7,) and np.all(np.abs(label) <= 1.0)
        np.testing.assert_array_equal(label, executed)
    assert r["phases"][:5] == ["approach", "descend", "grasp", "lift", "transport"]


def test_step_budget_counts_the_wait_steps(object_env):
    env, init_states = object_env
    r = X.run_expert_episode(env, init_states[1], max_steps=20)
    assert not r["success"] and r["steps"] == 30 and r["error"] is None


def test_footprint_of_known_objects(object_env):
    env, init_states = object_env
    env.seed(7)
    env.reset()
    env.set_init_state(init_states[0])
    ex = X.ScriptedExpert(env)
    # butter_1 is one collision box: its footprint and height are that box, whatever its pose
    m, d = ex.m, ex.d
    (g,) = ex.obj_geoms["butter_1"]
    dims = sorted(2 * m.geom_size[g])
    fp = ex.footprint("butter_1")
    np.testing.assert_allclose(sorted([fp.width, fp.length, fp.height]), dims, atol=2e-3)
    # the alphabet soup can stands upright: round, ~6 cm across, its footprint centred on the body
    fp = ex.footprint("alphabet_soup_1")
    assert 0.05 < fp.width <= fp.length < 0.07
    assert np.linalg.norm(fp.center - ex.obj_pos()[:2]) < 0.01
    assert fp.top - fp.bottom == pytest.approx(0.076, abs=0.005)
    # the basket's success site: what LIBERO's In() tests
    assert ex.target_kind == "site" and ex.region_half is not None
    np.testing.assert_allclose(ex.target_pos(), d.site_xpos[ex.target_id])


def test_noisy_episode_labels_clean_actions_and_is_reproducible(object_env):
    env, init_states = object_env

    def run(seed):
        rows = []
        X.run_expert_episode(
            env,
            init_states[0],
            max_steps=40,
            action_noise=0.2,
            noise_seed=seed,
            on_step=lambda o, a, e, t: rows.append((a.copy(), e.copy())),
        )
        return rows

    rows = run(3)
    assert len(rows) == 40
    labels = np.array([a for a, _ in rows])
    executed = np.array([e for _, e in rows])
    diff = executed[:, :6] - labels[:, :6]
    assert np.all(np.abs(executed) <= 1.0)
    assert np.mean(np.abs(diff) > 1e-6) > 0.5  # the arm dims are perturbed ...
    np.testing.assert_array_equal(executed[:, 6], labels[:, 6])  # ... the gripper is not
    again = run(3)
    np.testing.assert_array_equal(executed, np.array([e for _, e in again]))
    other = run(4)
    assert not np.array_equal(executed, np.array([e for _, e in other]))


def test_noisy_expert_still_succeeds(object_env):
    env, init_states = object_env
    r = X.run_expert_episode(env, init_states[2], max_steps=MAX_STEPS["libero_object"], action_noise=0.1, noise_seed=1)
    assert r["success"], r


def test_expert_solves_libero_spatial_task0():
    env, init_states = _control_env("libero_spatial", 0)  # black bowl -> plate (a rim grasp)
    try:
        ex = X.ScriptedExpert(env)
        r = X.run_expert_episode(env, init_states[0], max_steps=MAX_STEPS["libero_spatial"], expert=ex)
        assert r["success"], r
        assert ex.plan["rim"]  # the bowl is wider than the gripper
    finally:
        env.close()


def test_expert_drives_the_projects_libero_env():
    """The harness's LiberoEnv (rendered OffScreenRenderEnv): same API, a few steps only."""
    _require_libero("libero_object")
    from pytest_duquant.libero.episode import LiberoEnv
    from pytest_duquant.libero.protocol import ProtocolSettings

    env = LiberoEnv("libero_object", 0, ProtocolSettings())
    try:
        ex = X.ScriptedExpert(env.env)
        assert ex.task_env is env.env.env
        seen = []
        r = X.run_expert_episode(
            env,
            env.init_states[0],
            max_steps=4,
            expert=ex,
            on_step=lambda o, a, e, t: seen.append(o["agentview_image"].shape),
        )
        assert r["error"] is None, r["traceback"]
        assert r["steps"] == 14 and len(seen) == 4 and ex.phase == "approach"
        assert ex.task_env.sim is env.env.env.sim  # re-bound after LiberoEnv's hard reset
    finally:
        env.close()
