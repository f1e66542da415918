"""A cheap, deterministic stand-in for a LIBERO env, for testing the harness's plumbing.

It speaks the env interface the harness uses (seed, reset, set_init_state, step, close, language,
init_states) with LIBERO-shaped observations, but simulates nothing: the "end effector" moves by
the action's first three numbers × 0.01, and the task succeeds when its x coordinate passes
``0.05 × (1 + task_id % 3)`` from the init state's start. Use it as
``env_factory=functools.partial(FakeLiberoEnv, step_s=0.01)``; the real simulator is the default.
"""

from __future__ import annotations

import time

import numpy as np

from pytest_duquant.libero.protocol import INIT_STATES_PER_TASK


class FakeLiberoEnv:
    def __init__(
        self,
        suite: str,
        task_id: int,
        settings,
        *,
        step_s: float = 0.0,
        build_s: float = 0.0,
        error_trials: tuple[int, ...] = (),
        error_at_step: int = 12,
        resolution: int | None = None,
    ):
        if build_s:
            time.sleep(build_s)
        self.suite, self.task_id = suite, int(task_id)
        self.res = int(resolution or settings.resolution)
        self.step_s = float(step_s)
        self.error_trials = set(error_trials)
        self.error_at_step = int(error_at_step)
        self.language = f"fake task {task_id} of {suite}"
        self.init_states = np.arange(INIT_STATES_PER_TASK, dtype=np.float64)[:, None] * np.array(
            [[0.0, 0.001, 0.0]]
        )
        self.goal_dx = 0.05 * (1 + self.task_id % 3)
        self.seeded = None
        self.closed = False

    def seed(self, seed: int) -> None:
        self.seeded = int(seed)

    def reset(self):
        self.pos = np.zeros(3)
        self.trial = None
        self.n = 0
        return self._obs()

    def set_init_state(self, state):
        state = np.asarray(state, dtype=np.float64)
        self.pos = state.copy()
        self.start = state.copy()
        self.trial = int(round(state[1] / 0.001))
        self.n = 0
        return self._obs()

    def step(self, action, render: bool = True):
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (7,):
            raise ValueError(f"action has shape {a.shape}; expected (7,)")
        if not np.all(np.isfinite(a)):
            raise ValueError("action is not finite")
        if self.step_s:
            time.sleep(self.step_s)
        self.n += 1
        self.renders = getattr(self, "renders", 0) + bool(render)
        if self.trial in self.error_trials and self.n >= self.error_at_step:
            raise RuntimeError(f"fake simulator error at step {self.n}")
        self.pos = self.pos + 0.01 * np.clip(a[:3], -1, 1)
        done = bool(self.pos[0] - self.start[0] >= self.goal_dx - 1e-9)
        return self._obs(), 0.0, done, {}

    def check_success(self) -> bool:
        return bool(self.pos[0] - self.start[0] >= self.goal_dx - 1e-9)

    def _obs(self) -> dict:
        img = np.zeros((self.res, self.res, 3), dtype=np.uint8)
        img[: self.res // 2] = 200  # top half bright: the 180° flip is visible in the observation
        img[..., 0] = (self.n * 7) % 256
        return {
            "agentview_image": img,
            "robot0_eye_in_hand_image": img[:, ::-1].copy(),
            "robot0_eef_pos": self.pos.copy(),
            "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
            "robot0_gripper_qpos": np.array([0.04, -0.04]),
        }

    def close(self) -> None:
        self.closed = True
