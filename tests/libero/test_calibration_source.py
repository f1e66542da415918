"""Calibration observations from real LIBERO resets and from .npz files."""

import numpy as np
import pytest

from pytest_duquant.libero.calibration import (
    CalibrationSourceError,
    calibration_observations,
    npz_observations,
)
from pytest_duquant.libero.protocol import OBS_IMAGE, OBS_PROMPT, OBS_STATE, OBS_WRIST


def test_libero_resets_give_rollout_like_observations():
    obs = calibration_observations("libero:libero_spatial", n=2)
    assert len(obs) == 2
    for o in obs:
        assert o[OBS_IMAGE].shape == (224, 224, 3) and o[OBS_IMAGE].dtype == np.uint8
        assert o[OBS_WRIST].shape == (224, 224, 3) and o[OBS_IMAGE].std() > 1.0  # a rendered scene
        assert o[OBS_STATE].shape == (8,) and np.all(np.isfinite(o[OBS_STATE]))
    assert obs[0][OBS_PROMPT] != obs[1][OBS_PROMPT]  # tasks 0 and 1 of the suite
    assert not np.array_equal(obs[0][OBS_IMAGE], obs[1][OBS_IMAGE])


def test_npz_round_trip_and_errors(tmp_path):
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.integers(0, 255, (3, 224, 224, 3), dtype=np.uint8),
             wrist_image=rng.integers(0, 255, (3, 224, 224, 3), dtype=np.uint8),
             state=rng.normal(size=(3, 8)), prompt=np.array(["a", "b", "c"]))
    obs = npz_observations(path)
    assert [o[OBS_PROMPT] for o in obs] == ["a", "b", "c"] and obs[1][OBS_STATE].dtype == np.float32
    np.savez(tmp_path / "bad.npz", image=np.zeros((2, 4, 4, 3)), prompt=np.array(["x", "y"]))
    with pytest.raises(CalibrationSourceError, match="missing array 'wrist_image'"):
        npz_observations(tmp_path / "bad.npz")
    with pytest.raises(CalibrationSourceError, match="not found"):
        npz_observations(tmp_path / "nope.npz")
    with pytest.raises(CalibrationSourceError, match="unknown suite"):
        calibration_observations("libero:libero_99")
    with pytest.raises(CalibrationSourceError, match="use 'synthetic'"):
        calibration_observations("camera")
    assert calibration_observations("synthetic") is None
