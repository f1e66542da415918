"""Ray transport for the rollout scheduler (``backend="ray"``, ``--libero-backend=ray``).

Each worker is a Ray actor (``num_cpus=1``) holding one env and running the same
:class:`~pytest_duquant.libero.episode.EpisodeRunner` as a local worker process; the scheduler
in :mod:`pytest_duquant.libero.harness` stays in the driver and batches the policy calls, exactly
as with the local pool. Point ``address`` (or ``RAY_ADDRESS``) at a cluster to spread the envs over
its nodes; with neither, a local Ray instance is started for the run and shut down after it.

Ray is an optional extra: ``pip install -c constraints.txt ray``.
"""

from __future__ import annotations

import os

from pytest_duquant.libero.episode import EpisodeRunner, RolloutError
from pytest_duquant.libero.protocol import ProtocolSettings


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(
            "--libero-backend=ray needs Ray: pip install -c constraints.txt ray "
            "(or use the default local process pool: --libero-backend=local)"
        ) from None
    return ray


class _EnvWorker:
    """The actor body: one EpisodeRunner (one env)."""

    def __init__(self, settings: dict, env_factory, lazy_render: bool = True):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.runner = EpisodeRunner(ProtocolSettings(**settings), env_factory, lazy_render=lazy_render)

    def handle(self, cmd):
        import traceback

        try:
            return self.runner.handle(cmd)
        except Exception as exc:  # noqa: BLE001 - setup errors go to the driver as "fatal"
            return ("fatal", f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def pid(self) -> int:
        return os.getpid()


class RayTransport:
    def __init__(
        self,
        n: int,
        settings: ProtocolSettings,
        env_factory,
        address: str | None = None,
        num_cpus_per_worker: float = 1.0,
        init_kwargs: dict | None = None,
        lazy_render: bool = True,
    ):
        ray = self.ray = _import_ray()
        self.owns_ray = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            kwargs = dict(init_kwargs or {})
            if address in (None, "local"):  # a private local instance with one CPU per env worker
                kwargs.setdefault("num_cpus", max(n, 1))
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
                **kwargs,
            )
            self.owns_ray = True
        actor_cls = ray.remote(num_cpus=num_cpus_per_worker)(_EnvWorker)
        self.actors = [actor_cls.remote(dict(settings.__dict__), env_factory, lazy_render) for _ in range(n)]
        self.futs: dict[int, object] = {}
        self._owner: dict[object, int] = {}

    def send(self, w: int, cmd: tuple) -> None:
        fut = self.actors[w].handle.remote(cmd)
        self.futs[w] = fut
        self._owner[fut] = w

    def poll(self, busy: set[int], timeout: float | None) -> list[tuple[int, tuple]]:
        futs = [self.futs[w] for w in busy if w in self.futs]
        if not futs:
            return []
        ready, rest = self.ray.wait(futs, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready = ready + more
        out = []
        for fut in ready:
            w = self._owner.pop(fut)
            del self.futs[w]
            try:
                msg = self.ray.get(fut)
            except Exception as exc:  # noqa: BLE001 - RayActorError and friends
                raise RolloutError(
                    f"Ray LIBERO worker {w} failed: {type(exc).__name__}: {exc}"
                ) from None
            out.append((w, msg))
        return out

    def pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        ray = self.ray
        try:
            ray.get([a.handle.remote(("close",)) for a in self.actors], timeout=30)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed next anyway
            pass
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001
                pass
        if self.owns_ray:
            ray.shutdown()
