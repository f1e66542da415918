"""Shared test scaffolding: synthetic LIBERO-like result records (no simulator), written as JSONL."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

FINGERPRINT = "sha256-0123abcd"
PROTOCOL = "openpi-libero-v1"


def make_records(
    suite: str = "libero_spatial",
    tasks: int = 10,
    trials: int = 10,
    seed: int = 7,
    rate: float = 0.95,
    preset: str | None = "fp",
    fingerprint: str | None = FINGERPRINT,
    protocol: str | None = PROTOCOL,
    rng_seed: int = 0,
    outcomes: Mapping | None = None,
) -> list[dict]:
    """Records of tasks x trials episodes, trial-major; success from `outcomes[key]` (key = (suite, task_id,
    trial, seed); for another seed the same episode's) or drawn at `rate`."""
    rng = random.Random(rng_seed)
    by_episode = {tuple(k)[:3]: v for k, v in (outcomes or {}).items()}  # another seed: the same outcomes
    recs = []
    for trial in range(trials):
        for task in range(tasks):
            key = (suite, task, trial, seed)
            ok = bool(outcomes.get(key, by_episode[key[:3]])) if outcomes is not None else rng.random() < rate
            recs.append(
                {
                    "suite": suite,
                    "task_id": task,
                    "trial": trial,
                    "seed": seed,
                    "success": ok,
                    "steps": 100 if ok else 220,
                    "wall_s": 1.5,
                    "preset": preset,
                    "fingerprint": fingerprint,
                    "protocol": protocol,
                    "error": None,
                }
            )
    return recs


def write_jsonl(path: str | Path, recs, tail: str = "") -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in recs) + tail)
    return path


def pytest_plugin_args() -> list[str]:
    """Arguments that load this plugin into a child `python -m pytest`: none when the installed package's
    pytest11 entry point already loads it (adding `-p pytest_duquant.plugin` then registers the module a
    second time: "Plugin already registered under a different name"), else `-p pytest_duquant.plugin` (a
    checkout on PYTHONPATH, not installed)."""
    from importlib.metadata import entry_points

    if any(ep.value == "pytest_duquant.plugin" for ep in entry_points(group="pytest11")):
        return []
    return ["-p", "pytest_duquant.plugin"]
