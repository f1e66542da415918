"""Rollout results: one JSON object per finished episode (JSONL), the record defined once.

A line::

    {"suite": "libero_spatial", "task_id": 3, "trial": 17, "seed": 7, "success": true, "steps": 143,
     "wall_s": 41.2, "preset": "B", "fingerprint": "<checkpoint fingerprint>", "protocol": "openpi-libero-v1",
     "error": null, ...}

- :class:`EpisodeKey` (suite, task_id, trial, seed) pairs the same episode across runs; it is a tuple, so
  the statistics (``gate``) take it as any hashable key.
- :class:`EpisodeResult` is one line, validated: typed attributes for the fields above and a read-only
  mapping of everything the line holds (``record["queries"]`` reaches the rollout's extra fields).
- :func:`read_results` is the one reader (a file or a directory of ``*.jsonl``); :class:`ResultsWriter` the
  one writer: append + fsync per episode, a partial last line of a killed run is cut on open, an episode is
  never written twice, and :attr:`ResultsWriter.done` is what a rerun resumes from.

Only the standard library: every later room (golden, judge, reporting) and the rollouts read and write
this format.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "FIELDS",
    "KEY_FIELDS",
    "RUN_FIELDS",
    "EpisodeKey",
    "EpisodeResult",
    "ENV_PACKAGES",
    "ResultsError",
    "ResultsTruncatedWarning",
    "ResultsWriter",
    "environment",
    "outcomes",
    "read_results",
    "summarize",
]

KEY_FIELDS = ("suite", "task_id", "trial", "seed")
RUN_FIELDS = ("protocol", "fingerprint", "preset")  # one run per file: these agree on every line
FIELDS = (*KEY_FIELDS, "success", "steps", "wall_s", "preset", "fingerprint", "protocol", "error")
_ALIASES = {
    "task": "task_id",
    "checkpoint_fingerprint": "fingerprint",
    "ckpt_fingerprint": "fingerprint",
    "wall_time": "wall_s",
    "wall_time_s": "wall_s",
}


class ResultsError(ValueError):
    """A results file cannot be used (unreadable, malformed line, another run's episodes). Exit code 2."""

    exit_code = 2


class ResultsTruncatedWarning(UserWarning):
    """The last line of a results file was cut off (killed run) and was ignored."""


class EpisodeKey(NamedTuple):
    """The identity of an episode: the same key in two runs is the same init state and policy noise."""

    suite: str
    task_id: int
    trial: int
    seed: int

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> EpisodeKey:
        return cls(str(record["suite"]), int(record["task_id"]), int(record["trial"]), int(record["seed"]))

    def __str__(self) -> str:
        return f"{self.suite}/task{self.task_id}/trial{self.trial}/seed{self.seed}"


@dataclass(frozen=True)
class EpisodeResult(Mapping):
    """One finished episode (one line). ``extra`` holds the line's other keys (instruction, queries, ...)."""

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
    error: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> EpisodeKey:
        return EpisodeKey(self.suite, self.task_id, self.trial, self.seed)

    # -- the line as a mapping: the fields, then the extras
    def __getitem__(self, name: str) -> Any:
        if name in FIELDS:
            return getattr(self, name)
        return self.extra[name]

    def __iter__(self) -> Iterator[str]:
        yield from FIELDS
        yield from (k for k in self.extra if k not in FIELDS)

    def __len__(self) -> int:
        return len(FIELDS) + sum(1 for k in self.extra if k not in FIELDS)

    __hash__ = None  # a record is a value read from a file, not a key: use .key

    def to_dict(self) -> dict[str, Any]:
        return dict(self)

    @classmethod
    def from_dict(cls, obj: Any, where: str = "record", *, complete: bool = False) -> EpisodeResult:
        """Validate one parsed line. complete=True (the writer): every field of FIELDS must be present."""
        if not isinstance(obj, Mapping):
            raise ResultsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        data: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for k, v in obj.items():
            name = _ALIASES.get(k, k)
            if name in FIELDS:
                if name in data:
                    raise ResultsError(f"{where}: field {name!r} given twice (as {k!r} and an alias)")
                data[name] = v
            else:
                extra[k] = v
        need = FIELDS if complete else (*KEY_FIELDS, "success")
        missing = [f for f in need if f not in data]
        if missing:
            raise ResultsError(
                f"{where}: missing field(s) {', '.join(missing)}; each line needs {', '.join(need)}"
            )
        _check_types(data, where)
        return cls(extra=extra, **data)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(data: dict[str, Any], where: str) -> None:
    if not isinstance(data["suite"], str) or not data["suite"]:
        raise ResultsError(f"{where}: suite={data['suite']!r} must be a non-empty string")
    for f in ("task_id", "trial", "seed"):
        if not _is_int(data[f]) or data[f] < 0:
            raise ResultsError(f"{where}: {f}={data[f]!r} must be a non-negative integer")
    s = data["success"]
    if _is_int(s) and s in (0, 1):
        data["success"] = bool(s)
    elif not isinstance(s, bool):
        raise ResultsError(f"{where}: success={s!r} must be true or false")
    st = data.get("steps")
    if st is not None and (not _is_int(st) or st < 0):
        raise ResultsError(f"{where}: steps={st!r} must be a non-negative integer or null")
    w = data.get("wall_s")
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)):
        raise ResultsError(f"{where}: wall_s={w!r} must be a number or null")
    for f in (*RUN_FIELDS, "error"):
        v = data.get(f)
        if v is not None and not isinstance(v, str):
            raise ResultsError(f"{where}: {f}={v!r} must be a string or null")


# ---- what produced a record ---------------------------------------------------------------------------

#: packages whose versions can move a success rate (policy numerics, simulator, renderer)
ENV_PACKAGES = ("pytest-duquant", "torch", "numpy", "mujoco", "robosuite", "hf-libero", "libero", "triton")


def environment(device: str | None = None) -> dict[str, Any]:
    """The software stack and device of this process: ``{"versions": {...}, "device": ..., "machine": ...}``.

    Rollouts put it in every record (field ``env``) and goldens in their provenance, so the judge can say
    when a golden was made on another stack or device. ``device`` is the policy's torch device; for CUDA the
    GPU's name is added when torch is already imported.
    """
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in ENV_PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    dev = str(device) if device is not None else "cpu"
    torch = sys.modules.get("torch")
    if dev.startswith("cuda") and torch is not None:
        try:
            dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
        except Exception:  # noqa: BLE001 - the name is informative only
            pass
    return {"versions": versions, "device": dev, "machine": platform.machine()}


# ---- reading ----------------------------------------------------------------------------------------


def _parse(path: Path, data: bytes, on_truncated: str) -> tuple[list[EpisodeResult], int]:
    """Records of a file's bytes, and the length of its complete part (a partial last line is not)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: not UTF-8 text ({e})") from None
    lines = text.split("\n")
    out: list[EpisodeResult] = []
    end = 0
    for i, line in enumerate(lines, start=1):
        last_unterminated = i == len(lines)
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if last_unterminated and on_truncated != "error":
                    if on_truncated == "warn":
                        warnings.warn(
                            f"{path}:{i}: truncated last line ignored (killed run?): {line[:60]!r}",
                            ResultsTruncatedWarning,
                            stacklevel=4,
                        )
                    break
                raise ResultsError(
                    f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}): {line[:80]!r}; the file is "
                    "corrupt (only a partial last line is repaired automatically)"
                ) from None
            out.append(EpisodeResult.from_dict(obj, where=f"{path}:{i}"))
        end += len(line.encode("utf-8")) + (0 if last_unterminated else 1)
    return out, end


def _read_file(path: Path, on_truncated: str) -> list[EpisodeResult]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ResultsError(f"{path}: results file not found") from None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read results file ({e})") from None
    return _parse(path, data, on_truncated)[0]


def read_results(path: str | os.PathLike, *, on_truncated: str = "warn") -> list[EpisodeResult]:
    """Every record of a results JSONL file, or of every ``*.jsonl`` in a directory (sorted by name).

    on_truncated: an unterminated, unparsable last line (a run killed mid-write) is dropped with a
    ResultsTruncatedWarning ("warn", default), dropped silently ("ignore"), or an error ("error").
    A malformed line anywhere else is a ResultsError naming ``file:line``.
    """
    if on_truncated not in ("warn", "ignore", "error"):
        raise ValueError(f"on_truncated={on_truncated!r}: allowed are 'warn', 'ignore', 'error'")
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if not files:
            raise ResultsError(f"{p}: directory holds no *.jsonl results files")
        return [r for f in files for r in _read_file(f, on_truncated)]
    return _read_file(p, on_truncated)


def outcomes(records: Iterable[EpisodeResult]) -> dict[EpisodeKey, bool]:
    """key -> success, in first-seen order. A repeated episode must agree with itself."""
    out: dict[EpisodeKey, bool] = {}
    for r in records:
        k = r.key
        if k in out and out[k] != r.success:
            raise ResultsError(
                f"episode {k} appears twice with different outcomes ({out[k]} and {r.success}): "
                "the results are inconsistent"
            )
        out.setdefault(k, r.success)
    return out


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per suite: episodes, successes, errors and success rate."""
    per: dict[str, dict[str, Any]] = {}
    for rec in records:
        s = per.setdefault(rec["suite"], {"episodes": 0, "successes": 0, "errors": 0})
        s["episodes"] += 1
        s["successes"] += bool(rec["success"])
        s["errors"] += rec.get("error") is not None
    for s in per.values():
        s["success_rate"] = s["successes"] / s["episodes"] if s["episodes"] else float("nan")
    return per


# ---- writing and resuming ---------------------------------------------------------------------------


class ResultsWriter:
    """Append-only JSONL writer: each record is one ``os.write`` of a full line, then fsync.

    On open it cuts a partial last line (a run killed mid-write) and checks that the file's records belong
    to the same run (``run`` = protocol, fingerprint, preset). ``done`` maps the recorded episodes' keys to
    their records: a rerun skips them (resume).
    """

    def __init__(self, path: str | os.PathLike, run: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        records, end = _parse(self.path, data, "ignore")
        if end < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        if end and not data[:end].endswith(b"\n"):  # a complete last record without its newline
            with open(self.path, "ab") as f:
                f.write(b"\n")
        if run:
            mine = {k: run.get(k) for k in RUN_FIELDS}
            for rec in records:
                other = {k: rec[k] for k in RUN_FIELDS}
                if other != mine:
                    raise ResultsError(
                        f"{self.path}: holds episodes of another run ({other}); this run is {mine}. "
                        "Use another results file (one file per checkpoint × preset × protocol)."
                    )
        self.done: dict[EpisodeKey, EpisodeResult] = {}
        for rec in records:
            self.done.setdefault(rec.key, rec)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: Mapping[str, Any]) -> EpisodeResult:
        """Validate (every field of FIELDS present), write one line, fsync. -> the record as written."""
        result = EpisodeResult.from_dict(record, where=f"{self.path}: new record", complete=True)
        if result.key in self.done:
            raise ResultsError(f"{self.path}: episode {result.key} is already recorded; it is never written twice")
        line = (json.dumps(dict(result), sort_keys=True, separators=(",", ":")) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a short write on a regular file means the disk is full
            raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(self._fd)
        self.done[result.key] = result
        return result

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
