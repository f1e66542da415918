"""Shared builders for the gate/golden/results tests (synthetic LIBERO-like runs, no simulator)."""

from __future__ import annotations

import json

import numpy as np
import pytest

FP = "sha256-0123abcd"
PROTO = "openpi-libero-v1"


def make_records(
    suite="libero_spatial",
    tasks=10,
    trials=10,
    seed=7,
    rate=0.95,
    preset="fp",
    fingerprint=FP,
    protocol=PROTO,
    rng_seed=0,
    outcomes=None,
):
    rng = np.random.default_rng(rng_seed)
    recs = []
    for trial in range(trials):
        for task in range(tasks):
            key = (suite, task, trial, seed)
            ok = bool(outcomes[key]) if outcomes is not None else bool(rng.random() < rate)
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
                }
            )
    return recs


def write_jsonl(path, recs, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


@pytest.fixture
def builders():
    class B:
        make_records = staticmethod(make_records)
        write_jsonl = staticmethod(write_jsonl)
        fp = FP
        proto = PROTO

    return B
