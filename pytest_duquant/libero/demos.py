"""Demonstrations: the scripted expert's successful LIBERO episodes, stored as the policy will see them.

Each step of an expert episode (after openpi's 10 wait steps) is recorded with the observation the
rollout protocol builds for a policy query (:func:`pytest_duquant.libero.protocol.make_observation`:
both cameras rendered at 256, flipped 180°, resized with padding to 224; the 8-d state; the prompt)
and the expert's clean action label. With ``action_noise`` the *executed* action carries DART-style
noise while the label stays the expert's answer to the state it is in, so the data cover recovery
states.

On-disk format (numpy alone reads it; ``docs/demos.md``): a folder with

- ``demos.jsonl``: one JSON line per attempted episode (written as each ends, resumable): suite,
  task_id, trial (init state), seed, repeat, action_noise, noise_seed, success, steps, frames, file,
  expert_version, protocol, wall_s, error;
- ``<suite>/task<TT>_trial<II>_r<R>.npz`` for each successful episode (uncompressed ``np.savez``):
  ``image`` and ``wrist_image`` uint8 [T, 224, 224, 3], ``state`` float32 [T, 8], ``actions``
  float32 [T, 7] (labels), ``executed`` float32 [T, 7], ``step`` int32 [T] (env step index),
  ``prompt`` (0-d str) and ``meta`` (0-d str, the JSON line of the episode).

Failed episodes are recorded in ``demos.jsonl`` (so a rerun does not retry them) but keep no file.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pytest_duquant.libero.protocol import (
    DEFAULT_SEED,
    OBS_IMAGE,
    OBS_PROMPT,
    OBS_STATE,
    OBS_WRIST,
    ProtocolSettings,
    check_suite,
    make_observation,
)

MANIFEST = "demos.jsonl"
FORMAT = "pytest-duquant-demos-v1"


@dataclass(frozen=True)
class DemoJob:
    suite: str
    task_id: int
    trial: int
    repeat: int = 0
    seed: int = DEFAULT_SEED
    action_noise: float = 0.0

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.suite, self.task_id, self.trial, self.repeat)

    @property
    def noise_seed(self) -> int:
        return 1_000_003 * self.task_id + 1009 * self.trial + self.repeat

    @property
    def file(self) -> str:
        return f"{self.suite}/task{self.task_id:02d}_trial{self.trial:02d}_r{self.repeat}.npz"


def plan_jobs(
    suite: str, tasks: Iterable[int], trials: Iterable[int], repeats: int = 1, *, noise: float = 0.0,
    seed: int = DEFAULT_SEED,
) -> list[DemoJob]:
    """Repeat 0 of each (task, trial) is the clean expert; repeats >= 1 execute noisy actions."""
    check_suite(suite)
    return [
        DemoJob(suite, t, i, r, seed, 0.0 if r == 0 else float(noise))
        for t in tasks
        for i in trials
        for r in range(int(repeats))
    ]


def read_manifest(out_dir: str | Path) -> list[dict]:
    """The recorded episodes (a partial last line from a killed run is ignored)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _record_episode(env, job: DemoJob, settings: ProtocolSettings, out_dir: Path) -> dict:
    from pytest_duquant.libero import expert

    frames: dict[str, list] = {"image": [], "wrist_image": [], "state": [], "actions": [], "executed": [],
                               "step": []}

    def on_step(obs, label, executed, t):
        o = make_observation(obs, env.language, settings.resize)
        frames["image"].append(o[OBS_IMAGE])
        frames["wrist_image"].append(o[OBS_WRIST])
        frames["state"].append(o[OBS_STATE])
        frames["actions"].append(np.asarray(label, dtype=np.float32))
        frames["executed"].append(np.asarray(executed, dtype=np.float32))
        frames["step"].append(t)

    t0 = time.perf_counter()
    res = expert.run_expert_episode(
        env, env.init_states[job.trial], job.seed, max_steps=settings.max_steps_for(job.suite),
        num_steps_wait=settings.num_steps_wait, action_noise=job.action_noise, noise_seed=job.noise_seed,
        on_step=on_step,
    )
    record = {
        **asdict(job),
        "noise_seed": job.noise_seed,
        "prompt": env.language,
        "success": bool(res["success"]),
        "steps": int(res["steps"]),
        "frames": len(frames["step"]),
        "file": job.file if res["success"] else None,
        "expert_version": expert.EXPERT_VERSION,
        "protocol": settings.name,
        "format": FORMAT,
        "wall_s": round(time.perf_counter() - t0, 2),
        "error": res.get("error"),
        "host": platform.node(),
    }
    if res["success"]:
        path = out_dir / job.file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            image=np.stack(frames["image"]),
            wrist_image=np.stack(frames["wrist_image"]),
            state=np.stack(frames["state"]).astype(np.float32),
            actions=np.stack(frames["actions"]),
            executed=np.stack(frames["executed"]),
            step=np.asarray(frames["step"], dtype=np.int32),
            prompt=np.array(env.language),
            meta=np.array(json.dumps(record)),
        )
        os.replace(tmp, path)
    return record


def _worker(args) -> list[dict]:
    """One process: the jobs of one task (one env build), each appended to the manifest as it ends."""
    jobs, out_dir, settings, env_factory = args
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from pytest_duquant.libero.episode import resolve_env_factory

    out_dir = Path(out_dir)
    env = resolve_env_factory(env_factory)(jobs[0].suite, jobs[0].task_id, settings)
    records = []
    try:
        for job in jobs:
            records.append(_record_episode(env, job, settings, out_dir))
            _append(out_dir / MANIFEST, records[-1])  # one O_APPEND write per line: workers never interleave
    finally:
        env.close()
    return records


def _chunks(jobs: list[DemoJob], size: int) -> Iterator[list[DemoJob]]:
    """Chunks of one task each (one env build per chunk), clean repeats first, tasks taken in turn:
    a run stopped early leaves every task about equally covered."""
    by_task: dict[tuple[str, int], list[DemoJob]] = {}
    for j in sorted(jobs, key=lambda j: (j.repeat, j.trial)):
        by_task.setdefault((j.suite, j.task_id), []).append(j)
    groups = [[g[i : i + size] for i in range(0, len(g), size)] for g in by_task.values()]
    for k in range(max((len(g) for g in groups), default=0)):
        for g in groups:
            if k < len(g):
                yield g[k]


def collect_demos(
    jobs: list[DemoJob], out_dir: str | Path, *, workers: int = 1, chunk: int = 5,
    settings: ProtocolSettings | None = None, progress: bool = True, max_seconds: float | None = None,
    env_factory=None,
) -> list[dict]:
    """Run the jobs not yet in ``out_dir/demos.jsonl``; returns every record (old and new).

    ``max_seconds``: stop after this long (episodes in flight are dropped; rerun to resume).
    ``env_factory`` (tests): as :func:`pytest_duquant.libero.episode.resolve_env_factory`; the real env
    (rendered) by default."""
    import multiprocessing as mp

    from pytest_duquant.libero import sim_setup

    settings = settings or ProtocolSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["suite"], r["task_id"], r["trial"], r["repeat"]) for r in read_manifest(out)}
    todo = [j for j in jobs if j.key not in done]
    if env_factory is None:
        sim_setup.prepare()  # writes LIBERO's config once, before workers import libero
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="demos", unit="ep")
    ok = sum(1 for r in read_manifest(out) if r["success"])
    tasks = [(c, str(out), settings, env_factory) for c in _chunks(todo, max(1, int(chunk)))]
    deadline = None if max_seconds is None else time.monotonic() + float(max_seconds)
    if workers <= 1:
        results: Iterator = map(_worker, tasks)
    else:
        pool = mp.get_context("spawn").Pool(int(workers), maxtasksperchild=4)
        results = pool.imap_unordered(_worker, tasks)
    try:
        while True:
            try:
                if workers > 1 and deadline is not None:
                    recs = results.next(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    if deadline is not None and time.monotonic() > deadline:
                        break
                    recs = next(results)
            except StopIteration:
                break
            except mp.TimeoutError:
                break
            ok += sum(r["success"] for r in recs)
            if bar is not None:
                bar.update(len(recs))
                bar.set_postfix(kept=ok)
    finally:
        if workers > 1:
            pool.terminate()
        if bar is not None:
            bar.close()
    return read_manifest(out)


@dataclass
class Demo:
    """One successful episode read back (arrays as stored)."""

    image: np.ndarray
    wrist_image: np.ndarray
    state: np.ndarray
    actions: np.ndarray
    prompt: str
    meta: dict

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def load_demo(path: str | Path) -> Demo:
    with np.load(path, allow_pickle=False) as z:
        return Demo(
            image=z["image"], wrist_image=z["wrist_image"], state=z["state"], actions=z["actions"],
            prompt=str(z["prompt"]), meta=json.loads(str(z["meta"])),
        )


def demo_files(out_dir: str | Path, *, trials: Iterable[int] | None = None) -> list[Path]:
    """The files of the successful episodes in the manifest (optionally only these init states)."""
    keep = None if trials is None else set(int(t) for t in trials)
    out = Path(out_dir)
    files = []
    for r in read_manifest(out):
        if r["success"] and r.get("file") and (keep is None or r["trial"] in keep):
            files.append(out / r["file"])
    return sorted(set(files))


__all__ = [
    "Demo", "DemoJob", "FORMAT", "MANIFEST", "OBS_PROMPT", "collect_demos", "demo_files", "load_demo",
    "plan_jobs", "read_manifest",
]
