"""openpi's LIBERO protocol as pure functions: observation processing, seeds, ids (no simulator)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_duquant.libero import protocol as P


def test_protocol_constants_follow_openpi():
    assert P.PROTOCOL == "openpi-libero-v1"
    assert P.MAX_STEPS == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
        "libero_90": 400,
    }
    s = P.ProtocolSettings()
    assert (s.resolution, s.resize, s.num_steps_wait, s.replan_steps) == (256, 224, 10, 5)
    assert P.DUMMY_ACTION == (0, 0, 0, 0, 0, 0, -1)
    assert s.name == "openpi-libero-v1"
    assert s.max_steps_for("libero_10") == 520


def test_changed_settings_change_the_protocol_name():
    s = P.ProtocolSettings(max_steps=20)
    assert s.name == "openpi-libero-v1+max_steps=20"
    assert s.max_steps_for("libero_spatial") == 20
    assert P.ProtocolSettings(replan_steps=10).name != P.PROTOCOL
    with pytest.raises(ValueError, match="libero_spatal.*allowed"):
        s.max_steps_for("libero_spatal")


@pytest.mark.parametrize("axis,angle", [((0, 0, 1), 0.7), ((1, 0, 0), 2.5), ((0.6, 0.8, 0), math.pi - 1e-3)])
def test_quat2axisangle_inverts_axis_angle(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    quat = np.concatenate([axis * math.sin(angle / 2), [math.cos(angle / 2)]])  # (x, y, z, w)
    np.testing.assert_allclose(P.quat2axisangle(quat), axis * angle, atol=1e-9)
    assert np.all(P.quat2axisangle([0, 0, 0, 1]) == 0)
    q = np.array([0.0, 0.0, 0.0, 1.2])  # w clipped to 1 like robosuite; the input is not modified
    assert np.all(P.quat2axisangle(q) == 0) and q[3] == 1.2


def test_quat2axisangle_matches_robosuite():
    tu = pytest.importorskip("robosuite.utils.transform_utils", reason="robosuite (hf-libero) not installed")
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        np.testing.assert_allclose(P.quat2axisangle(q), tu.quat2axisangle(q.copy()), atol=1e-12)


def test_resize_with_pad_keeps_aspect_and_pads_with_zeros():
    img = np.full((100, 200, 3), 255, np.uint8)
    out = P.resize_with_pad(img, 224, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    # 200x100 -> 224x112, padded 56 rows above and below
    assert out[:56].max() == 0 and out[-56:].max() == 0
    assert out[56:168].min() == 255
    square = (np.arange(256 * 256 * 3) % 251).astype(np.uint8).reshape(256, 256, 3)
    assert P.resize_with_pad(square, 224, 224).shape == (224, 224, 3)
    assert P.resize_with_pad(square, 256, 256) is square


def _lib_obs():
    agent = np.zeros((256, 256, 3), np.uint8)
    agent[:128] = 200  # top half bright
    agent[:, :128, 2] = 50  # left half blue
    wrist = np.zeros((256, 256, 3), np.uint8)
    wrist[:, :10] = 255
    axis_angle = np.array([0.0, 0.0, 0.5])
    quat = np.array([0.0, 0.0, math.sin(0.25), math.cos(0.25)])
    return {
        "agentview_image": agent,
        "robot0_eye_in_hand_image": wrist,
        "robot0_eef_pos": np.array([0.1, -0.2, 1.0]),
        "robot0_eef_quat": quat,
        "robot0_gripper_qpos": np.array([0.039, -0.039]),
    }, axis_angle


def test_make_observation_flips_resizes_and_builds_the_8d_state():
    obs, axis_angle = _lib_obs()
    out = P.make_observation(obs, "put the bowl on the plate")
    assert set(out) == {"observation/image", "observation/wrist_image", "observation/state", "prompt"}
    img, wrist = out["observation/image"], out["observation/wrist_image"]
    assert img.shape == wrist.shape == (224, 224, 3) and img.dtype == np.uint8
    # rotated 180 degrees: the bright top half is now the bottom half, the blue left half is right
    assert img[-50:].mean() > 150 and img[:50, :, :2].max() == 0
    assert img[:, -50:, 2].min() == 50 and img[:, :50, 2].max() in (0, 200)
    assert wrist[:, -5:].min() == 255 and wrist[:, :100].max() == 0
    np.testing.assert_allclose(
        out["observation/state"], np.concatenate([[0.1, -0.2, 1.0], axis_angle, [0.039, -0.039]]), atol=1e-6
    )
    assert out["observation/state"].shape == (8,)
    assert out["prompt"] == "put the bowl on the plate"


def test_noise_seed_is_a_pure_function_of_the_episode_and_query():
    a = P.noise_seed(7, "libero_spatial", 3, 17, 0)
    assert a == P.noise_seed(7, "libero_spatial", 3, 17, 0)
    others = {
        P.noise_seed(7, "libero_spatial", 3, 17, 1),
        P.noise_seed(8, "libero_spatial", 3, 17, 0),
        P.noise_seed(7, "libero_goal", 3, 17, 0),
        P.noise_seed(7, "libero_spatial", 4, 17, 0),
        P.noise_seed(7, "libero_spatial", 3, 18, 0),
    }
    assert a not in others and len(others) == 5
    assert 0 <= a < 2**32


def test_parse_ids():
    assert P.parse_ids(None, n=3) == [0, 1, 2]
    assert P.parse_ids("all", n=2) == [0, 1]
    assert P.parse_ids("0,2,5-7", n=10) == [0, 2, 5, 6, 7]
    with pytest.raises(ValueError, match="tasks='12'.*out of range 0..9"):
        P.parse_ids("12", n=10)
    with pytest.raises(ValueError, match="not an id"):
        P.parse_ids("a", n=10)
