"""Calibration observations from real LIBERO resets, or from a user's .npz file.

`calibration_observations(source, n)` is the one entry point:
- "synthetic"            the built-in synthetic LIBERO-like observations (no simulator);
- "libero:<suite>"       real resets of the suite's init states, after the protocol's wait steps, rendered
                         and processed exactly as a rollout's first policy query sees them;
- "<path>.npz"           arrays `image` [N,H,W,3] uint8, `wrist_image` [N,H,W,3] uint8, `state` [N,8] and
                         `prompt` [N] (strings).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pytest_duquant.libero.protocol import OBS_IMAGE, OBS_PROMPT, OBS_STATE, OBS_WRIST


class CalibrationSourceError(ValueError):
    """The calibration source is unusable; the message names it and what is expected."""


def libero_reset_observations(suite: str, n: int, *, seed: int = 7, tasks: list[int] | None = None) -> list[dict]:
    """`n` policy inputs from real resets: task i mod T, trial i // T (init state), after the wait steps."""
    from pytest_duquant.libero.episode import LiberoEnv
    from pytest_duquant.libero.protocol import DUMMY_ACTION, ProtocolSettings, make_observation

    settings = ProtocolSettings()
    tasks = list(range(_n_tasks(suite))) if tasks is None else list(tasks)
    envs: dict[int, LiberoEnv] = {}
    out: list[dict] = []
    try:
        for i in range(n):
            task, trial = tasks[i % len(tasks)], i // len(tasks)
            if task not in envs:
                envs[task] = LiberoEnv(suite, task, settings)
            env = envs[task]
            env.seed(seed)
            env.reset()
            obs = env.set_init_state(env.init_states[trial % len(env.init_states)])
            for _ in range(settings.num_steps_wait):
                obs, _reward, _done, _info = env.step(np.asarray(DUMMY_ACTION, dtype=np.float64))
            out.append(make_observation(obs, env.language, settings.resize))
    finally:
        for env in envs.values():
            env.close()
    return out


def _n_tasks(suite: str) -> int:
    from pytest_duquant.libero import sim_setup

    benchmark, _ = sim_setup.import_libero()
    return int(benchmark.get_benchmark_dict()[suite]().n_tasks)


def npz_observations(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CalibrationSourceError(f"calibration file {path}: not found")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise CalibrationSourceError(f"calibration file {path}: not a readable .npz ({exc})") from None
    need = {"image": 4, "wrist_image": 4, "state": 2, "prompt": 1}
    for key, ndim in need.items():
        if key not in data.files:
            raise CalibrationSourceError(f"calibration file {path}: missing array {key!r} (has {data.files})")
        if data[key].ndim != ndim:
            raise CalibrationSourceError(
                f"calibration file {path}: {key!r} has shape {data[key].shape}, expected {ndim} dimensions")
    n = len(data["prompt"])
    for key in need:
        if len(data[key]) != n:
            raise CalibrationSourceError(f"calibration file {path}: {key!r} has {len(data[key])} rows, prompt has {n}")
    return [
        {OBS_IMAGE: data["image"][i], OBS_WRIST: data["wrist_image"][i],
         OBS_STATE: data["state"][i].astype(np.float32), OBS_PROMPT: str(data["prompt"][i])}
        for i in range(n)
    ]


def calibration_observations(source: str | None, n: int = 8) -> list[dict] | None:
    """Observations for `source` (see the module doc); None for the default (synthetic)."""
    if source in (None, "", "synthetic"):
        return None
    if source.startswith("libero:"):
        from pytest_duquant.libero.sim_setup import SUITES

        suite = source.split(":", 1)[1]
        if suite not in SUITES:
            raise CalibrationSourceError(f"calibration source {source!r}: unknown suite; allowed: {', '.join(SUITES)}")
        return libero_reset_observations(suite, n)
    if source.endswith(".npz"):
        return npz_observations(source)
    raise CalibrationSourceError(
        f"calibration source {source!r}: use 'synthetic', 'libero:<suite>' or a path to a .npz file")
