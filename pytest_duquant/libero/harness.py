"""Run LIBERO episodes in parallel workers, batching every policy call in this (the parent) process.

    summary = run_rollouts(policy, "libero_spatial", tasks=[0, 1], trials=50, seed=7, workers=8,
                           results_path="results/spatial_B.jsonl", preset="B")

Workers (local processes, or Ray actors with ``backend="ray"``) each own one env and send an
observation whenever they need a new action chunk; the parent gathers all waiting observations into
one ``policy.infer_batch`` call and sends each worker its chunk. Each finished episode is appended
to the results JSONL at once (flush + fsync); a rerun with the same file skips every recorded
episode, so an interrupted run resumes and never loses or repeats one.

Errors: the simulator's exceptions end that episode as a failure with the error text (openpi's
protocol). The policy's exceptions abort the run (nothing is recorded for the episodes in flight;
a rerun resumes them): a crashing model is a bug to fix, not a success rate.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from pathlib import Path

import numpy as np

from pytest_duquant.libero.episode import EpisodeRunner, EpisodeSpec, RolloutError
from pytest_duquant.libero.protocol import (
    DEFAULT_SEED,
    INIT_STATES_PER_TASK,
    SUITE_TASKS,
    ProtocolSettings,
    check_suite,
)
from pytest_duquant.results import EpisodeKey, EpisodeResult, ResultsWriter, environment, summarize

BACKENDS = ("local", "ray")


@dataclass
class RolloutSummary:
    results_path: Path
    records: list[EpisodeResult]  # every requested episode that is recorded, in (task, trial) order
    new: int  # episodes run now (the rest were already in the file)
    requested: int
    wall_s: float
    policy_calls: int = 0
    policy_s: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)
    workers: int = 1
    backend: str = "local"
    new_keys: set = field(default_factory=set)

    @property
    def successes(self) -> int:
        return sum(bool(r["success"]) for r in self.records)

    @property
    def success_rate(self) -> float:
        return self.successes / len(self.records) if self.records else float("nan")

    @property
    def complete(self) -> bool:
        return len(self.records) == self.requested

    def stats(self) -> dict:
        new = [r for r in self.records if EpisodeKey.of(r) in self.new_keys]
        steps = sum(r["steps"] for r in new)
        sim_s = sum(r.get("sim_s", 0.0) for r in new)
        return {
            "episodes": len(self.records),
            "new_episodes": self.new,
            "successes": self.successes,
            "success_rate": self.success_rate,
            "wall_s": round(self.wall_s, 3),
            "workers": self.workers,
            "backend": self.backend,
            "policy_calls": self.policy_calls,
            "policy_ms_per_call": 1e3 * self.policy_s / self.policy_calls if self.policy_calls else None,
            "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
            "sim_ms_per_step": 1e3 * sim_s / steps if steps else None,
            "env_steps": steps,
            "episodes_per_hour": 3600.0 * self.new / self.wall_s if self.wall_s > 0 and self.new else None,
            "per_suite": summarize(self.records),
        }


# ---- transports: the same step machine behind pipes or Ray actors ----------------------------------


def _worker_main(conn, settings: dict, env_factory, worker_id: int, lazy_render: bool = True) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    runner = EpisodeRunner(ProtocolSettings(**settings), env_factory, lazy_render=lazy_render)
    try:
        while True:
            try:
                cmd = conn.recv()
            except EOFError:
                break
            if cmd[0] == "close":
                runner.close_env()
                conn.send(("closed",))
                break
            try:
                msg = runner.handle(cmd)
            except Exception as exc:  # noqa: BLE001 - setup errors (env build, bad trial) go to the parent
                msg = ("fatal", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            conn.send(msg)
    finally:
        runner.close_env()
        conn.close()


class LocalTransport:
    """One spawned process per worker, a duplex pipe each."""

    def __init__(self, n: int, settings: ProtocolSettings, env_factory, lazy_render: bool = True):
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or an EGL context
        self.conns, self.procs = [], []
        for i in range(n):
            parent, child = ctx.Pipe(duplex=True)
            p = ctx.Process(
                target=_worker_main,
                args=(child, settings.__dict__, env_factory, i, lazy_render),
                name=f"libero-worker-{i}",
                daemon=True,
            )
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        self._index = {id(c): i for i, c in enumerate(self.conns)}

    def send(self, w: int, cmd: tuple) -> None:
        self.conns[w].send(cmd)

    def poll(self, busy: set[int], timeout: float | None) -> list[tuple[int, tuple]]:
        ready = mp_wait([self.conns[w] for w in busy], timeout)
        out = []
        for c in ready:
            w = self._index[id(c)]
            try:
                out.append((w, c.recv()))
            except (EOFError, OSError):
                code = self.procs[w].exitcode
                raise RolloutError(
                    f"LIBERO worker {w} died (exit code {code}; -9 = killed, e.g. out of memory; "
                    "each rendered env needs ~2.1 GB)"
                ) from None
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(("close",))
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + 20
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)
        for c in self.conns:
            c.close()


def _make_transport(
    backend: str, n: int, settings: ProtocolSettings, env_factory, ray_address=None, lazy_render: bool = True
):
    if backend == "local":
        return LocalTransport(n, settings, env_factory, lazy_render)
    if backend == "ray":
        from pytest_duquant.libero.ray_backend import RayTransport

        return RayTransport(n, settings, env_factory, address=ray_address, lazy_render=lazy_render)
    raise ValueError(f"backend={backend!r}: allowed: {', '.join(BACKENDS)}")


# ---- the scheduler ------------------------------------------------------------------------------


def _as_policy(policy_or_factory):
    if hasattr(policy_or_factory, "infer_batch"):
        return policy_or_factory
    if callable(policy_or_factory):
        policy = policy_or_factory()
        if not hasattr(policy, "infer_batch"):
            raise TypeError(f"policy factory returned {type(policy).__name__}, which has no infer_batch")
        return policy
    raise TypeError(
        f"policy={policy_or_factory!r}: need an object with infer_batch(observations, "
        "noise_seeds) or a zero-argument factory returning one"
    )


def _trial_list(trials) -> list[int]:
    ids = list(range(int(trials))) if isinstance(trials, (int, np.integer)) else [int(t) for t in trials]
    for t in ids:
        if not 0 <= t < INIT_STATES_PER_TASK:
            raise ValueError(
                f"trials: trial {t} out of range 0..{INIT_STATES_PER_TASK - 1} "
                f"(each task has {INIT_STATES_PER_TASK} init states)"
            )
    return ids


def plan_episodes(suite: str, tasks: Sequence[int] | None, trials, seed: int) -> list[EpisodeKey]:
    check_suite(suite)
    n = SUITE_TASKS[suite]
    task_ids = list(range(n)) if tasks is None else [int(t) for t in tasks]
    for t in task_ids:
        if not 0 <= t < n:
            raise ValueError(f"tasks: task {t} out of range for {suite} (0..{n - 1})")
    return [EpisodeKey(suite, t, trial, int(seed)) for t in task_ids for trial in _trial_list(trials)]


@contextlib.contextmanager
def _cpu_policy_threads(policy, local_workers: int):
    """A policy computing on the CPU beside local env workers gets the cores they leave (at least one).

    torch's default (one thread per core) makes its threads spin against the workers' physics and
    software rendering: on 2 cores with 2 workers a quantized policy call measured ~6x slower.
    """
    dev = getattr(policy, "device", None)
    torch = sys.modules.get("torch")
    if torch is None or local_workers <= 0 or getattr(dev, "type", str(dev)) != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - local_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_rollouts(
    policy,
    suite: str,
    tasks: Sequence[int] | None = None,
    trials=1,
    seed: int = DEFAULT_SEED,
    workers: int = 1,
    results_path: str | os.PathLike = "libero_results.jsonl",
    *,
    preset: str | None = None,
    fingerprint: str | None = None,
    protocol: ProtocolSettings | None = None,
    backend: str = "local",
    video_dir: str | os.PathLike | None = None,
    env_factory=None,
    progress: bool = True,
    batch_wait_s: float = 0.05,
    max_batch: int | None = None,
    ray_address: str | None = None,
    on_record: Callable[[EpisodeResult], None] | None = None,
    lazy_render: bool = True,
) -> RolloutSummary:
    """Run (suite, tasks × trials, seed) episodes under openpi's protocol; resume from results_path.

    ``policy``: an object with ``infer_batch`` or a zero-argument factory (called here, once, and
    only if an episode is left to run). ``preset``/``fingerprint`` default to the policy's
    ``preset``/``fingerprint`` attributes. ``env_factory`` (tests): ``"module:callable"`` or a
    picklable callable ``(suite, task_id, settings) -> env``. ``max_batch``: most observations per
    policy call. ``batch_wait_s``: how long a waiting observation may wait for others to batch with
    (the call goes as soon as every busy worker waits). ``lazy_render=False`` renders every step
    (same results, ~4x slower on CPU; only for checking the equivalence).
    """
    t_run = time.perf_counter()
    settings = protocol or ProtocolSettings()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed: {', '.join(BACKENDS)}")
    if int(workers) < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    if video_dir is not None:
        _check_video_support()
    keys = plan_episodes(suite, tasks, trials, seed)
    # a policy, or a factory that carries the labels (pi05_policy_factory does): label before loading
    if preset is None:
        preset = getattr(policy, "preset", None)
    if fingerprint is None:
        fingerprint = getattr(policy, "fingerprint", None)
    run = {"protocol": settings.name, "fingerprint": fingerprint, "preset": preset}
    writer = ResultsWriter(results_path, run)
    pending = [k for k in keys if k not in writer.done]
    summary = RolloutSummary(Path(results_path), [], 0, len(keys), 0.0, workers=0, backend=backend)
    new_records: dict[EpisodeKey, dict] = {}
    try:
        if pending:
            policy_obj = _as_policy(policy)
            n_workers = min(int(workers), len(pending))
            summary.workers = n_workers
            with _cpu_policy_threads(policy_obj, n_workers if backend == "local" else 0):
                _schedule(
                    policy_obj,
                    pending,
                    n_workers,
                    settings,
                    env_factory,
                    backend,
                    writer,
                    summary,
                    new_records,
                    run,
                    video_dir,
                    progress,
                    keys,
                    batch_wait_s,
                    max_batch,
                    ray_address,
                    on_record,
                    lazy_render,
                )
    finally:
        writer.close()
    summary.records = [writer.done[k] for k in keys if k in writer.done]
    summary.new_keys = set(new_records)
    summary.new = len(new_records)
    summary.wall_s = time.perf_counter() - t_run
    return summary


def _check_video_support() -> None:
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as exc:  # noqa: BLE001
        raise RolloutError(
            f"video_dir given but MP4 writing is unavailable ({type(exc).__name__}: {exc}); "
            "install it with: pip install imageio imageio-ffmpeg"
        ) from None


def _progress_bar(total: int, initial: int, successes: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar = tqdm(
        total=total, initial=initial, desc="LIBERO episodes", unit="ep", dynamic_ncols=True, smoothing=0.1
    )
    bar.set_postfix_str(f"success {successes}/{initial}")
    return bar


def _schedule(
    policy,
    pending,
    n_workers,
    settings,
    env_factory,
    backend,
    writer,
    summary,
    new_records,
    run,
    video_dir,
    progress,
    keys,
    batch_wait_s,
    max_batch,
    ray_address,
    on_record,
    lazy_render,
):
    done_keys = [k for k in keys if k in writer.done]
    successes = sum(bool(writer.done[k]["success"]) for k in done_keys)
    finished = len(done_keys)
    bar = _progress_bar(len(keys), finished, successes, progress)
    env = environment(getattr(policy, "device", None))  # every record says what produced it
    queue = list(pending)  # ordered by (task, trial): workers keep their env while the task lasts
    transport = _make_transport(backend, n_workers, settings, env_factory, ray_address, lazy_render)
    worker_task: dict[int, tuple[str, int] | None] = {w: None for w in range(n_workers)}
    busy: set[int] = set()
    waiting: list[tuple[int, dict, int]] = []  # (worker, observation, noise seed)
    first_wait = None

    def next_for(w: int) -> EpisodeKey | None:
        if not queue:
            return None
        cur = worker_task[w]
        for i, k in enumerate(queue):
            if (k.suite, k.task_id) == cur:
                return queue.pop(i)
        # a new task: prefer one no other worker is on, so envs are built once per task
        others = {t for ww, t in worker_task.items() if ww != w and ww in busy}
        for i, k in enumerate(queue):
            if (k.suite, k.task_id) not in others:
                return queue.pop(i)
        return queue.pop(0)

    def start(w: int) -> bool:
        k = next_for(w)
        if k is None:
            return False
        spec = EpisodeSpec(
            k.suite,
            k.task_id,
            k.trial,
            k.seed,
            run["preset"],
            run["fingerprint"],
            None if video_dir is None else str(video_dir),
        )
        worker_task[w] = (k.suite, k.task_id)
        transport.send(w, ("begin", spec))
        busy.add(w)
        return True

    try:
        for w in range(n_workers):
            start(w)
        while busy or waiting:
            in_flight = busy - {w for w, _, _ in waiting}
            timeout = None
            if waiting:
                timeout = max(0.0, batch_wait_s - (time.monotonic() - first_wait))
            msgs = transport.poll(in_flight, timeout) if in_flight else []
            for w, msg in msgs:
                kind = msg[0]
                if kind == "obs":
                    if not waiting:
                        first_wait = time.monotonic()
                    waiting.append((w, msg[1], msg[2]))
                elif kind == "done":
                    rec = writer.append({**msg[1], "env": env})
                    new_records[rec.key] = rec
                    finished += 1
                    successes += bool(rec["success"])
                    if on_record is not None:
                        on_record(rec)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"success {successes}/{finished}")
                    busy.discard(w)
                    start(w)
                elif kind == "fatal":
                    raise RolloutError(f"LIBERO worker {w}: {msg[1]}\n{msg[2]}")
                else:
                    raise RolloutError(f"LIBERO worker {w}: unexpected message {kind!r}")
            in_flight = busy - {w for w, _, _ in waiting}
            full = max_batch is not None and len(waiting) >= max_batch
            expired = waiting and (time.monotonic() - first_wait) >= batch_wait_s
            if waiting and (not in_flight or full or expired):
                batch = waiting if max_batch is None else waiting[:max_batch]
                waiting = [] if max_batch is None else waiting[max_batch:]
                first_wait = time.monotonic() if waiting else None
                _infer_and_send(policy, batch, transport, summary, settings)
    finally:
        if bar is not None:
            bar.close()
        transport.close()


def _infer_and_send(policy, batch, transport, summary, settings) -> None:
    obs = [o for _, o, _ in batch]
    seeds = [s for _, _, s in batch]
    t0 = time.perf_counter()
    try:
        actions = policy.infer_batch(obs, seeds)
    except Exception as exc:
        raise RolloutError(
            f"policy.infer_batch failed on a batch of {len(obs)}: {type(exc).__name__}: {exc}"
        ) from exc
    summary.policy_s += time.perf_counter() - t0
    summary.policy_calls += 1
    summary.batch_sizes.append(len(obs))
    actions = np.asarray(_to_numpy(actions))
    if (
        actions.ndim != 3
        or actions.shape[0] != len(obs)
        or actions.shape[2] < 7
        or actions.shape[1] < settings.replan_steps
    ):
        raise RolloutError(
            f"policy.infer_batch returned shape {actions.shape}; expected "
            f"[{len(obs)}, horizon>={settings.replan_steps}, 7]"
        )
    for (w, _, _), chunk in zip(batch, actions, strict=True):
        transport.send(w, ("advance", np.ascontiguousarray(chunk[:, :7], dtype=np.float64)))


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return x
