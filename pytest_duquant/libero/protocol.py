"""openpi's LIBERO evaluation protocol (``examples/libero/main.py``), as data and pure functions.

Facts (docs/contract.md, "LIBERO protocol"): 256×256 render, ``env.seed(seed)``, reset,
``set_init_state(init_states[trial])``;
the first 10 steps send the no-op ``[0,0,0,0,0,0,-1]``; per-suite max steps; both camera images
flipped 180° and resized with zero padding to 224; state = eef position (3) + axis-angle of the
eef quaternion (3) + gripper qpos (2); prompt = the task's language; 5 actions of each chunk run
before the next query; success = ``done`` from ``env.step``; an exception ends the episode as a
failure. Step budget: openpi's loop runs ``while t < max_steps + num_steps_wait`` with ``t``
counting the wait steps, i.e. at most ``max_steps + 10`` env steps of which at most ``max_steps``
carry policy actions; we do exactly that. The results name the protocol (:data:`PROTOCOL`), since
lerobot's LIBERO protocol differs (spatial 280 steps, 360 px render, 10 actions per query).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from pytest_duquant.policies.pi05.images import resize_with_pad

PROTOCOL = "openpi-libero-v1"

MAX_STEPS = {
    "libero_spatial": 220,  # longest training demo 193 steps
    "libero_object": 280,  # 254
    "libero_goal": 300,  # 270
    "libero_10": 520,  # 505
    "libero_90": 400,  # 373
}
SUITE_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
INIT_STATES_PER_TASK = 50
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
ACTION_DIM = 7
STATE_DIM = 8
DEFAULT_SEED = 7
DEFAULT_TRIALS = 50

OBS_IMAGE = "observation/image"
OBS_WRIST = "observation/wrist_image"
OBS_STATE = "observation/state"
OBS_PROMPT = "prompt"


@dataclass(frozen=True)
class ProtocolSettings:
    """The knobs of the protocol. Anything but the defaults is a different protocol name."""

    resolution: int = 256
    resize: int = 224
    num_steps_wait: int = 10
    replan_steps: int = 5
    max_steps: int | None = None  # None: the suite's MAX_STEPS

    def max_steps_for(self, suite: str) -> int:
        check_suite(suite)
        return MAX_STEPS[suite] if self.max_steps is None else int(self.max_steps)

    @property
    def name(self) -> str:
        """``openpi-libero-v1``, or that name with the changed settings when they differ."""
        diffs = [f"{k}={v}" for k, v in asdict(self).items() if v != getattr(_DEFAULT, k)]
        return PROTOCOL if not diffs else f"{PROTOCOL}+" + ",".join(diffs)

    def with_overrides(self, **kw) -> ProtocolSettings:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


_DEFAULT = ProtocolSettings()
DEFAULT_PROTOCOL = _DEFAULT


def check_suite(suite: str) -> str:
    if suite not in MAX_STEPS:
        raise ValueError(f"suite={suite!r}: unknown LIBERO suite; allowed: {', '.join(MAX_STEPS)}")
    return suite


def parse_ids(text: str | None, *, n: int, what: str = "tasks") -> list[int]:
    """``"0,2,5-7"`` -> [0, 2, 5, 6, 7]; None/""/"all" -> range(n). Range-checked against n."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return list(range(n))
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                ids = list(range(lo, hi + 1))
            else:
                ids = [int(part)]
        except ValueError:
            raise ValueError(f"{what}={text!r}: {part!r} is not an id or a range like 0-4") from None
        for i in ids:
            if not 0 <= i < n:
                raise ValueError(f"{what}={text!r}: id {i} out of range 0..{n - 1}")
            if i not in out:
                out.append(i)
    return out


def quat2axisangle(quat) -> np.ndarray:
    """Axis-angle (3) of an (x, y, z, w) quaternion, as robosuite's transform_utils (openpi copies it)."""
    q = np.array(quat, dtype=np.float64).copy()
    q[3] = min(max(q[3], -1.0), 1.0)
    den = math.sqrt(1.0 - q[3] * q[3])
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return (q[:3] * 2.0 * math.acos(q[3])) / den


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if np.issubdtype(img.dtype, np.floating):
        return (255 * np.clip(img, 0.0, 1.0)).astype(np.uint8)
    return img


def make_observation(obs: dict, prompt: str, resize: int = 224) -> dict:
    """The policy input openpi's LIBERO client builds from one LIBERO observation dict."""
    img = np.ascontiguousarray(obs["agentview_image"][::-1, ::-1])
    wrist = np.ascontiguousarray(obs["robot0_eye_in_hand_image"][::-1, ::-1])
    state = np.concatenate(
        (
            np.asarray(obs["robot0_eef_pos"], dtype=np.float64),
            quat2axisangle(obs["robot0_eef_quat"]),
            np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64),
        )
    )
    return {
        OBS_IMAGE: _to_uint8(resize_with_pad(_to_uint8(img), resize, resize)),
        OBS_WRIST: _to_uint8(resize_with_pad(_to_uint8(wrist), resize, resize)),
        OBS_STATE: state.astype(np.float32),
        OBS_PROMPT: str(prompt),
    }


def noise_seed(seed: int, suite: str, task_id: int, trial: int, query: int = 0) -> int:
    """Policy-noise seed of one query of one episode, a pure function of its identity (32-bit).

    FP and quantized runs of the same (seed, suite, task, trial) draw the same noise at the same
    query index, so their outcomes are paired; different episodes get unrelated seeds.
    """
    key = f"{PROTOCOL}|{int(seed)}|{suite}|{int(task_id)}|{int(trial)}|{int(query)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")
