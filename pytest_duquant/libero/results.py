"""Rollout results: one JSON object per finished episode, appended and fsynced as it finishes.

Record (one line)::

    {"suite": "libero_spatial", "task_id": 3, "trial": 17, "seed": 7, "success": true,
     "steps": 143, "wall_s": 41.2, "preset": "B", "fingerprint": "<checkpoint fingerprint>",
     "protocol": "openpi-libero-v1", "error": null, "instruction": "<task language>", "queries": 27,
     "video": null}

An episode's key is (suite, task_id, trial, seed). A file holds one run (one protocol, checkpoint
fingerprint and preset); any number of suites, tasks and trials. A run killed at any moment
leaves at worst one partial last line, which :class:`ResultsWriter` cuts off before appending,
so a rerun repeats only the unfinished episodes and never loses or duplicates one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REQUIRED = (
    "suite",
    "task_id",
    "trial",
    "seed",
    "success",
    "steps",
    "wall_s",
    "preset",
    "fingerprint",
    "protocol",
    "error",
)
RUN_FIELDS = ("protocol", "fingerprint", "preset")


class ResultsFileError(ValueError):
    """A results file cannot be used (corrupt line, or records of another run)."""


@dataclass(frozen=True, order=True)
class EpisodeKey:
    suite: str
    task_id: int
    trial: int
    seed: int

    @classmethod
    def of(cls, record: dict) -> EpisodeKey:
        return cls(str(record["suite"]), int(record["task_id"]), int(record["trial"]), int(record["seed"]))

    def __str__(self) -> str:
        return f"{self.suite}/task{self.task_id}/trial{self.trial}/seed{self.seed}"


def _parse(path: Path, data: bytes) -> tuple[list[dict], int]:
    """Records of complete lines, and the byte length of the complete part (a partial tail is dropped)."""
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    records = []
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ResultsFileError(
                f"{path}:{lineno}: not a JSON object ({exc.msg}); the file is corrupt "
                "(only a partial last line is repaired automatically)"
            ) from None
        missing = [k for k in REQUIRED if k not in rec] if isinstance(rec, dict) else list(REQUIRED)
        if missing:
            raise ResultsFileError(
                f"{path}:{lineno}: record lacks {', '.join(missing)}; each line needs {', '.join(REQUIRED)}"
            )
        records.append(rec)
    tail = data[end:]
    if tail.strip():
        # A complete JSON object without its newline is still a finished episode (killed between
        # write and newline cannot happen: we write both at once, but be liberal in what we read).
        try:
            rec = json.loads(tail)
            if isinstance(rec, dict) and all(k in rec for k in REQUIRED):
                records.append(rec)
                end = len(data)
        except json.JSONDecodeError:
            pass
    return records, end


def read_results(path: str | os.PathLike) -> list[dict]:
    """All complete records of a results file (a truncated last line is ignored). Missing file: []."""
    p = Path(path)
    if not p.exists():
        return []
    records, _ = _parse(p, p.read_bytes())
    return records


def latest_by_key(records: Iterable[dict]) -> dict[EpisodeKey, dict]:
    out: dict[EpisodeKey, dict] = {}
    for rec in records:
        out.setdefault(EpisodeKey.of(rec), rec)  # the first record of a key wins (there is only one)
    return out


class ResultsWriter:
    """Append-only JSONL writer: each record is one ``os.write`` of a full line, then fsync.

    On open it cuts a partial last line (a run killed mid-write) and checks that the file's records
    belong to the same run (``run`` = protocol, fingerprint, preset).
    """

    def __init__(self, path: str | os.PathLike, run: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        records, end = _parse(self.path, data)
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        if end and not data[:end].endswith(b"\n"):
            with open(self.path, "ab") as f:
                f.write(b"\n")
        if run:
            for rec in records:
                other = {k: rec.get(k) for k in RUN_FIELDS}
                mine = {k: run.get(k) for k in RUN_FIELDS}
                if other != mine:
                    raise ResultsFileError(
                        f"{self.path}: holds episodes of another run ({other}); this run is {mine}. "
                        "Use another --out file (one file per checkpoint × preset × protocol)."
                    )
        self.done: dict[EpisodeKey, dict] = latest_by_key(records)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise ValueError(f"result record lacks {', '.join(missing)}")
        key = EpisodeKey.of(record)
        if key in self.done:
            raise ResultsFileError(
                f"{self.path}: episode {key} is already recorded; it is never written twice"
            )
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a short write on a regular file means the disk is full
            raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(self._fd)
        self.done[key] = record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize(records: Iterable[dict]) -> dict:
    """Per-suite and overall episodes, successes, errors and success rate."""
    per: dict[str, dict] = {}
    for rec in records:
        s = per.setdefault(rec["suite"], {"episodes": 0, "successes": 0, "errors": 0})
        s["episodes"] += 1
        s["successes"] += bool(rec["success"])
        s["errors"] += rec.get("error") is not None
    for s in per.values():
        s["success_rate"] = s["successes"] / s["episodes"] if s["episodes"] else float("nan")
    return per
