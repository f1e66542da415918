"""Read rollout results: one JSON object per line (JSONL), one line per finished episode.

Canonical fields of a line (docs/contract.md, "Outputs"):

    {"suite": "libero_spatial", "task_id": 3, "trial": 17, "seed": 7, "success": true, "steps": 143,
     "wall_s": 41.2, "preset": "B", "fingerprint": "<checkpoint fingerprint>", "protocol": "openpi-libero-v1"}

Required: suite (str), task_id, trial, seed (int), success (bool). Optional: steps (int), wall_s (number),
preset, fingerprint, protocol (str). Accepted aliases: ``task`` for task_id, ``checkpoint_fingerprint`` /
``ckpt_fingerprint`` for fingerprint, ``wall_time`` / ``wall_time_s`` for wall_s. Other keys are kept in
``extra``. A run killed mid-write leaves a truncated last line: it is dropped with a warning (the episode
will simply be rerun on resume). A malformed line anywhere else is an error naming the file and line.

No dependency beyond the standard library.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_duquant.libero.results import REQUIRED

__all__ = [
    "EpisodeResult",
    "ResultsFormatError",
    "ResultsTruncatedWarning",
    "episode_key",
    "outcomes",
    "read_results",
]

_ALIASES = {
    "task": "task_id",
    "checkpoint_fingerprint": "fingerprint",
    "ckpt_fingerprint": "fingerprint",
    "wall_time": "wall_s",
    "wall_time_s": "wall_s",
}
# The writer (libero/results.py) owns the record layout; the gate reads the same fields ("error" is optional).
_FIELDS = tuple(f for f in REQUIRED if f != "error")


class ResultsFormatError(ValueError):
    """A results file cannot be read (CLI exit code 2). The message names the file and line."""

    exit_code = 2


class ResultsTruncatedWarning(UserWarning):
    """The last line of a results file was cut off (killed run) and was ignored."""


def episode_key(suite: str, task_id: int, trial: int, seed: int) -> tuple[str, int, int, int]:
    """The key that pairs the same episode across runs: (suite, task_id, trial, seed)."""
    return (str(suite), int(task_id), int(trial), int(seed))


@dataclass(frozen=True)
class EpisodeResult:
    suite: str
    task_id: int
    trial: int
    seed: int
    success: bool
    steps: int | None = None
    wall_s: float | None = None
    preset: str | None = None
    fingerprint: str | None = None
    protocol: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> tuple[str, int, int, int]:
        return episode_key(self.suite, self.task_id, self.trial, self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in _FIELDS}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, obj: Any, where: str = "record") -> EpisodeResult:
        if not isinstance(obj, dict):
            raise ResultsFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        data: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in obj.items():
            name = _ALIASES.get(k, k)
            if name in _FIELDS:
                if name in data:
                    raise ResultsFormatError(f"{where}: field {name!r} given twice (as {k!r} and an alias)")
                data[name] = v
            else:
                extra[k] = v
        missing = [f for f in ("suite", "task_id", "trial", "seed", "success") if f not in data]
        if missing:
            raise ResultsFormatError(
                f"{where}: missing field(s) {', '.join(missing)}; required are suite, "
                "task_id, trial, seed, success"
            )
        if not isinstance(data["suite"], str) or not data["suite"]:
            raise ResultsFormatError(f"{where}: suite={data['suite']!r} must be a non-empty string")
        for f in ("task_id", "trial", "seed"):
            v = data[f]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ResultsFormatError(f"{where}: {f}={v!r} must be a non-negative integer")
        s = data["success"]
        if isinstance(s, bool):
            pass
        elif isinstance(s, int) and s in (0, 1):
            s = bool(s)
        else:
            raise ResultsFormatError(f"{where}: success={s!r} must be true or false")
        data["success"] = s
        st = data.get("steps")
        if st is not None and (isinstance(st, bool) or not isinstance(st, int) or st < 0):
            raise ResultsFormatError(f"{where}: steps={st!r} must be a non-negative integer or null")
        w = data.get("wall_s")
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)):
            raise ResultsFormatError(f"{where}: wall_s={w!r} must be a number or null")
        for f in ("preset", "fingerprint", "protocol"):
            v = data.get(f)
            if v is not None and not isinstance(v, str):
                raise ResultsFormatError(f"{where}: {f}={v!r} must be a string or null")
        return cls(extra=extra, **data)


def _read_one(path: Path, on_truncated: str) -> list[EpisodeResult]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ResultsFormatError(f"{path}: results file not found") from None
    except OSError as e:
        raise ResultsFormatError(f"{path}: cannot read results file ({e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ResultsFormatError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.split("\n")
    ends_with_newline = text.endswith("\n")
    if ends_with_newline:
        lines = lines[:-1]
    out: list[EpisodeResult] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last_unterminated = i == len(lines) and not ends_with_newline
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if last_unterminated and on_truncated != "error":
                if on_truncated == "warn":
                    warnings.warn(
                        f"{path}:{i}: truncated last line ignored (killed run?): {line[:60]!r}",
                        ResultsTruncatedWarning,
                        stacklevel=3,
                    )
                break
            raise ResultsFormatError(
                f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}"
            ) from None
        out.append(EpisodeResult.from_dict(obj, where=f"{path}:{i}"))
    return out


def read_results(path: str | Path, *, on_truncated: str = "warn") -> list[EpisodeResult]:
    """Read a results JSONL file, or every ``*.jsonl`` in a directory (sorted by name).

    on_truncated: what to do with an unterminated, unparsable last line: "warn" (default, drop it with a
    ResultsTruncatedWarning), "ignore" (drop silently) or "error".
    """
    if on_truncated not in ("warn", "ignore", "error"):
        raise ValueError(f"on_truncated={on_truncated!r}: allowed are 'warn', 'ignore', 'error'")
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise ResultsFormatError(f"{p}: directory holds no *.jsonl results files")
        out: list[EpisodeResult] = []
        for f in files:
            out.extend(_read_one(f, on_truncated))
        return out
    return _read_one(p, on_truncated)


def outcomes(records: Iterable[EpisodeResult]) -> dict[tuple[str, int, int, int], bool]:
    """key -> success, in first-seen order. A repeated episode must agree with itself (resume overlap)."""
    out: dict[tuple[str, int, int, int], bool] = {}
    for r in records:
        k = r.key
        if k in out and out[k] != r.success:
            raise ResultsFormatError(
                f"episode {k} appears twice with different outcomes "
                f"({out[k]} and {r.success}): the results are inconsistent"
            )
        out.setdefault(k, r.success)
    return out
