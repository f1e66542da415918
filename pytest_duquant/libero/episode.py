"""One worker's side of the rollouts: an env per worker and an episode as a step machine.

The policy never runs here. :class:`EpisodeRunner` takes commands and answers with messages, so the
same code runs in a local worker process (pipes) and in a Ray actor:

- ``begin(spec)`` -> builds (or reuses) the task's env, seeds, resets, sets the init state, runs
  the wait steps, and answers ``("obs", observation, noise_seed)`` or ``("done", record)``;
- ``advance(actions)`` -> runs up to ``replan_steps`` actions of the chunk; answers the same.

Everything that can go wrong in the simulator or in observation processing ends the episode as a
failure with the error text (openpi's protocol); the env is rebuilt before the next episode.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pytest_duquant.libero.protocol import (
    DUMMY_ACTION,
    ProtocolSettings,
    check_suite,
    make_observation,
    noise_seed,
)


class RolloutError(RuntimeError):
    """The run could not go on (a worker died, the env could not be built, the policy raised)."""


@dataclass(frozen=True)
class EpisodeSpec:
    suite: str
    task_id: int
    trial: int
    seed: int
    preset: str | None = None
    fingerprint: str | None = None
    video_dir: str | None = None  # write an MP4 here when the episode fails


class LiberoEnv:
    """A real LIBERO task env (``OffScreenRenderEnv``) with its language and init states.

    ``step(action, render=False)`` skips the two camera renders of that step (the cameras' sensors
    return a blank image instead); physics, sensor timing and every other observation are
    untouched. The harness renders only the steps whose images a policy query (or a video) reads:
    in openpi's protocol that is 1 step in 5, and rendering is ~95% of a CPU step's cost.
    ``tests/libero`` checks that query images and the state trajectory are byte-identical to
    rendering every step.
    """

    def __init__(self, suite: str, task_id: int, settings: ProtocolSettings):
        from pytest_duquant.libero import sim_setup

        sim_setup.check_suite_assets(check_suite(suite))
        benchmark, OffScreenRenderEnv = sim_setup.import_libero()
        task_suite = benchmark.get_benchmark_dict()[suite]()
        if not 0 <= task_id < task_suite.n_tasks:
            raise ValueError(f"task_id={task_id}: {suite} has tasks 0..{task_suite.n_tasks - 1}")
        task = task_suite.get_task(task_id)
        self.language = str(task.language)
        self.init_states = task_suite.get_task_init_states(task_id)
        self.env = OffScreenRenderEnv(
            bddl_file_name=task_suite.get_task_bddl_file_path(task_id),
            camera_heights=settings.resolution,
            camera_widths=settings.resolution,
        )

    def seed(self, seed: int) -> None:
        self.env.seed(seed)

    def reset(self):
        out = self.env.reset()
        self._wrap_cameras()  # a (hard) reset rebuilds robosuite's observables: wrap them again
        return out

    def set_init_state(self, state):
        self._render = True
        return self.env.set_init_state(state)

    def step(self, action, render: bool = True):
        self._render = bool(render)
        try:
            return self.env.step(action)
        finally:
            self._render = True

    def _wrap_cameras(self) -> None:
        self._render = True
        observables = self.env.env._observables
        for name, ob in observables.items():
            sensor = ob._sensor
            if getattr(sensor, "__modality__", None) != "image" or not name.endswith("_image"):
                continue
            if getattr(sensor, "_duquant_lazy", False):
                continue

            def lazy(obs_cache, _real=sensor, _blank={}):  # noqa: B006 - one blank cache per camera
                if self._render:
                    img = _real(obs_cache)
                    _blank.setdefault("img", np.zeros_like(img))
                    return img
                if "img" not in _blank:  # never rendered yet: render once for the shape
                    _blank["img"] = np.zeros_like(_real(obs_cache))
                return _blank["img"]

            lazy.__modality__ = sensor.__modality__
            lazy._duquant_lazy = True
            ob._sensor = lazy

    def check_success(self) -> bool:
        return bool(self.env.check_success())

    def close(self) -> None:
        env, self.env = getattr(self, "env", None), None
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - EGL teardown noise must not mask results
                pass


def resolve_env_factory(factory) -> Callable:
    """None -> :class:`LiberoEnv`; ``"module:attr"`` -> that callable; a callable -> itself."""
    if factory is None:
        return LiberoEnv
    if isinstance(factory, str):
        mod, _, attr = factory.partition(":")
        if not attr:
            raise ValueError(f"env_factory={factory!r}: expected 'module:callable'")
        return getattr(importlib.import_module(mod), attr)
    return factory


class EpisodeRunner:
    """Holds one env (rebuilt when the task changes) and the state of the episode in progress."""

    def __init__(
        self, settings: ProtocolSettings | dict | None = None, env_factory=None, lazy_render: bool = True
    ):
        if isinstance(settings, dict):
            settings = ProtocolSettings(**settings)
        self.settings = settings or ProtocolSettings()
        self.env_factory = resolve_env_factory(env_factory)
        self.env = None
        self.env_key: tuple[str, int] | None = None
        self.spec: EpisodeSpec | None = None
        self.env_builds = 0
        self.lazy_render = bool(lazy_render)  # render only the steps a query reads (see LiberoEnv)

    # ---- env lifetime -----------------------------------------------------------------------
    def _ensure_env(self, suite: str, task_id: int):
        if self.env is None or self.env_key != (suite, task_id):
            self.close_env()
            t0 = time.perf_counter()
            self.env = self.env_factory(suite, task_id, self.settings)
            self.build_s = time.perf_counter() - t0
            self.env_key = (suite, task_id)
            self.env_builds += 1
        return self.env

    def close_env(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env, self.env_key = None, None

    # ---- commands -----------------------------------------------------------------------------
    def handle(self, cmd: tuple):
        kind = cmd[0]
        if kind == "begin":
            return self.begin(cmd[1])
        if kind == "advance":
            return self.advance(cmd[1])
        if kind == "close":
            self.close_env()
            return ("closed",)
        raise ValueError(f"unknown worker command {kind!r}")

    def begin(self, spec: EpisodeSpec | dict):
        if isinstance(spec, dict):
            spec = EpisodeSpec(**spec)
        self.spec = spec
        self.t_start = time.perf_counter()
        self.sim_s = 0.0
        self.env_steps = 0
        self.queries = 0
        self.frames: list[np.ndarray] | None = [] if spec.video_dir else None
        self.error: str | None = None
        self.success = False
        self.max_steps = self.settings.max_steps_for(spec.suite)
        self.budget = self.max_steps + self.settings.num_steps_wait
        self.t = 0
        env = self._ensure_env(spec.suite, spec.task_id)  # build errors are fatal: raised to the parent
        self.language = env.language
        n_init = len(env.init_states)
        if not 0 <= spec.trial < n_init:
            raise ValueError(
                f"trial={spec.trial}: {spec.suite} task {spec.task_id} has init states 0..{n_init - 1}"
            )
        try:
            t0 = time.perf_counter()
            env.seed(spec.seed)
            env.reset()
            self.obs = env.set_init_state(env.init_states[spec.trial])
            self.reset_s = time.perf_counter() - t0
            while self.t < self.settings.num_steps_wait:
                if self._step(DUMMY_ACTION, render=self.t == self.settings.num_steps_wait - 1):
                    return self._finish()
        except Exception as exc:  # noqa: BLE001 - the protocol: an exception ends the episode as a failure
            return self._fail(exc)
        return self._query()

    def advance(self, actions):
        try:
            chunk = np.asarray(actions, dtype=np.float64)
            if chunk.ndim != 2 or chunk.shape[1] < 7:
                raise ValueError(f"action chunk has shape {chunk.shape}; expected [horizon, 7]")
            if chunk.shape[0] < self.settings.replan_steps:
                raise ValueError(
                    f"action chunk has {chunk.shape[0]} actions; the protocol runs "
                    f"{self.settings.replan_steps} of each chunk"
                )
            n = self.settings.replan_steps
            for i, action in enumerate(chunk[:n, :7]):
                if self.t >= self.budget:
                    break
                if self._step(action.tolist(), render=i == n - 1):
                    return self._finish()
        except Exception as exc:  # noqa: BLE001
            return self._fail(exc)
        if self.t >= self.budget:
            return self._finish()
        return self._query()

    # ---- internals ----------------------------------------------------------------------------
    def _step(self, action, render: bool) -> bool:
        t0 = time.perf_counter()
        render = render or self.frames is not None or not self.lazy_render
        obs, _reward, done, _info = self.env.step(action, render=render)
        self.sim_s += time.perf_counter() - t0
        self.env_steps += 1
        self.obs = obs
        if self.frames is not None:
            self.frames.append(np.ascontiguousarray(obs["agentview_image"][::-1, ::-1]))
        if done:
            self.success = True
            return True
        self.t += 1
        return False

    def _query(self):
        try:
            observation = make_observation(self.obs, self.language, self.settings.resize)
        except Exception as exc:  # noqa: BLE001
            return self._fail(exc)
        seed = noise_seed(self.spec.seed, self.spec.suite, self.spec.task_id, self.spec.trial, self.queries)
        self.queries += 1
        return ("obs", observation, seed)

    def _fail(self, exc: BaseException):
        self.error = f"{type(exc).__name__}: {exc}"
        self.traceback = traceback.format_exc(limit=8)
        self.success = False
        out = self._finish()
        self.close_env()  # the env may be in any state: build a fresh one for the next episode
        return out

    def _finish(self):
        spec = self.spec
        video = None
        if self.frames is not None and not self.success and self.frames:
            video = write_video(self.frames, Path(spec.video_dir) / video_name(spec))
        record = {
            "suite": spec.suite,
            "task_id": spec.task_id,
            "trial": spec.trial,
            "seed": spec.seed,
            "success": bool(self.success),
            "steps": self.env_steps,
            "wall_s": round(time.perf_counter() - self.t_start, 3),
            "preset": spec.preset,
            "fingerprint": spec.fingerprint,
            "protocol": self.settings.name,
            "error": self.error,
            "instruction": getattr(self, "language", None),
            "queries": self.queries,
            "sim_s": round(self.sim_s, 3),
            "reset_s": round(getattr(self, "reset_s", 0.0), 3),
            "max_steps": self.max_steps,
            "video": video,
            "worker_pid": os.getpid(),
        }
        self.frames = None
        return ("done", record)


def video_name(spec: EpisodeSpec) -> str:
    return f"{spec.suite}_task{spec.task_id:02d}_trial{spec.trial:02d}_seed{spec.seed}_failure.mp4"


def write_video(frames, path: Path, fps: int = 20) -> str | None:
    """MP4 via imageio + imageio-ffmpeg (20 fps = LIBERO's control rate). None if they are missing."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        imageio.mimwrite(str(path), list(frames), fps=fps, macro_block_size=16)
    except Exception:  # noqa: BLE001 - no ffmpeg backend: results matter more than the video
        return None
    return str(path)


def spec_dict(spec: EpisodeSpec) -> dict:
    return asdict(spec)
