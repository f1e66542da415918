"""LIBERO golden files: the FP reference run's per-episode outcomes, judged against by the gate.

Layout: ``golden/libero/<fingerprint>/<suite>.json`` (one file per checkpoint fingerprint x suite).
Human-readable JSON, one episode per line, checked by :func:`validate_golden` (no jsonschema needed)::

    {
     "schema": "pytest-duquant/libero-golden",
     "schema_version": 1,
     "suite": "libero_spatial",
     "protocol": "openpi-libero-v1",
     "fingerprint": "<checkpoint fingerprint>",
     "alpha": 0.05,
     "allowed_drop": {"A": 0.03, "B": 0.05, "precision": 0.02, "speed": 0.08},
     "summary": {"episodes": 500, "successes": 494, "success_rate": 0.988, "tasks": 10},
     "provenance": {"checkpoint_fingerprint": "...", "seed": 7, "date": "2026-11-24T12:00:00Z",
                    "versions": {...}, "config": {...}, ...},
     "episodes": [
      {"suite": "libero_spatial", "task_id": 0, "trial": 0, "seed": 7, "success": true, "steps": 123},
      ...
     ]
    }

A golden whose fingerprint, protocol or suite differs from the run's is refused
(:class:`GoldenMismatchError`, exit code 2). Writing is explicit (:func:`write_golden`), never
silently overwrites: an existing, different golden needs ``overwrite=True``, is kept as a timestamped
``.bak`` beside it, and the returned change list says what changed.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results_io import EpisodeResult, episode_key

__all__ = [
    "DEFAULT_ALLOWED_DROP",
    "DEFAULT_ALPHA",
    "DEFAULT_PROTOCOL",
    "SCHEMA",
    "SCHEMA_VERSION",
    "GoldenEpisode",
    "GoldenError",
    "GoldenExistsError",
    "GoldenMismatchError",
    "GoldenNotFoundError",
    "GoldenSchemaError",
    "GoldenWriteResult",
    "LiberoGolden",
    "check_compatible",
    "diff_goldens",
    "find_golden",
    "golden_from_results",
    "golden_path",
    "golden_to_json",
    "read_golden",
    "validate_golden",
    "write_golden",
]

SCHEMA = "pytest-duquant/libero-golden"
SCHEMA_VERSION = 1
DEFAULT_PROTOCOL = "openpi-libero-v1"
DEFAULT_ALPHA = 0.05
#: allowed drop in success rate (0.05 = 5 points) per preset; the fp preset is the reference itself
DEFAULT_ALLOWED_DROP: dict[str, float] = {"A": 0.03, "B": 0.05, "precision": 0.02, "speed": 0.08}

_TOP_KEYS = (
    "schema",
    "schema_version",
    "suite",
    "protocol",
    "fingerprint",
    "alpha",
    "allowed_drop",
    "summary",
    "provenance",
    "episodes",
)
_PROV_REQUIRED = ("checkpoint_fingerprint", "seed", "date", "versions", "config")


class GoldenError(Exception):
    """Any problem with a golden file; the CLI maps it to exit code 2."""

    exit_code = 2


class GoldenSchemaError(GoldenError, ValueError):
    """The file is not a valid LIBERO golden; ``errors`` lists every problem with its JSON path."""

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = list(errors)
        shown = "\n  ".join(self.errors[:20])
        more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(f"{source}: invalid LIBERO golden ({len(self.errors)} problem(s)):\n  {shown}{more}")


class GoldenMismatchError(GoldenError, ValueError):
    """The golden was made for another checkpoint fingerprint, protocol or suite than the run's."""


class GoldenExistsError(GoldenError, FileExistsError):
    """Writing would replace a different golden and overwrite was not requested."""

    def __init__(self, path: Path, changes: list[str]):
        self.path = path
        self.changes = changes
        super().__init__(
            f"{path}: a different golden exists; pass overwrite=True (--duquant-update-golden) "
            "to replace it (the old one is kept as a .bak). Changes:\n  " + "\n  ".join(changes)
        )


class GoldenNotFoundError(GoldenError, FileNotFoundError):
    """No golden file where one was expected."""


@dataclass(frozen=True)
class GoldenEpisode:
    suite: str
    task_id: int
    trial: int
    seed: int
    success: bool
    steps: int | None = None

    @property
    def key(self) -> tuple[str, int, int, int]:
        return episode_key(self.suite, self.task_id, self.trial, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "task_id": self.task_id,
            "trial": self.trial,
            "seed": self.seed,
            "success": self.success,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class LiberoGolden:
    suite: str
    protocol: str
    fingerprint: str
    alpha: float
    allowed_drop: Mapping[str, float]
    episodes: tuple[GoldenEpisode, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)

    # ---- derived
    @property
    def successes(self) -> int:
        return sum(e.success for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / len(self.episodes)

    def outcomes(self) -> dict[tuple[str, int, int, int], bool]:
        """key (suite, task_id, trial, seed) -> success, in file order."""
        return {e.key: e.success for e in self.episodes}

    def allowed_drop_for(self, preset: str) -> float:
        for k, v in self.allowed_drop.items():
            if k.lower() == str(preset).lower():
                return float(v)
        raise GoldenMismatchError(
            f"golden for suite {self.suite!r} has no allowed drop for preset {preset!r} "
            f"(it has {', '.join(sorted(self.allowed_drop)) or 'none'}); pass --allowed-drop"
        )

    def to_dict(self) -> dict[str, Any]:
        tasks = len({e.task_id for e in self.episodes})
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "suite": self.suite,
            "protocol": self.protocol,
            "fingerprint": self.fingerprint,
            "alpha": self.alpha,
            "allowed_drop": dict(self.allowed_drop),
            "summary": {
                "episodes": len(self.episodes),
                "successes": self.successes,
                "success_rate": round(self.success_rate, 6),
                "tasks": tasks,
            },
            "provenance": dict(self.provenance),
            "episodes": [e.to_dict() for e in self.episodes],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<golden>") -> LiberoGolden:
        errors = validate_golden(data)
        if errors:
            raise GoldenSchemaError(source, errors)
        eps = tuple(
            GoldenEpisode(e["suite"], e["task_id"], e["trial"], e["seed"], e["success"], e.get("steps"))
            for e in data["episodes"]
        )
        return cls(
            suite=data["suite"],
            protocol=data["protocol"],
            fingerprint=data["fingerprint"],
            alpha=float(data["alpha"]),
            allowed_drop={k: float(v) for k, v in data["allowed_drop"].items()},
            episodes=eps,
            provenance=dict(data["provenance"]),
        )


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_golden(data: Any) -> list[str]:
    """Every schema problem of a parsed golden, as 'path: problem' strings (empty list = valid)."""
    err: list[str] = []
    if not isinstance(data, dict):
        return [f"$: expected a JSON object, got {type(data).__name__}"]
    for k in _TOP_KEYS:
        if k not in data:
            err.append(f"$.{k}: missing")
    for k in data:
        if k not in _TOP_KEYS:
            err.append(f"$.{k}: unknown key (allowed: {', '.join(_TOP_KEYS)})")
    if "schema" in data and data["schema"] != SCHEMA:
        err.append(f"$.schema: {data['schema']!r}, expected {SCHEMA!r}")
    if "schema_version" in data and data["schema_version"] != SCHEMA_VERSION:
        err.append(f"$.schema_version: {data['schema_version']!r}, this version reads {SCHEMA_VERSION}")
    for k in ("suite", "protocol", "fingerprint"):
        if k in data and (not isinstance(data[k], str) or not data[k]):
            err.append(f"$.{k}: must be a non-empty string, got {data[k]!r}")
    if "alpha" in data and not (_is_num(data["alpha"]) and 0 < data["alpha"] < 0.5):
        err.append(f"$.alpha: {data['alpha']!r} must be a number in (0, 0.5)")
    ad = data.get("allowed_drop")
    if "allowed_drop" in data:
        if not isinstance(ad, dict) or not ad:
            err.append("$.allowed_drop: must be a non-empty object preset -> drop")
        else:
            for p, v in ad.items():
                if not (_is_num(v) and 0 <= v < 1):
                    err.append(f"$.allowed_drop.{p}: {v!r} must be a number in [0, 1)")
    prov = data.get("provenance")
    if "provenance" in data:
        if not isinstance(prov, dict):
            err.append("$.provenance: must be an object")
        else:
            for k in _PROV_REQUIRED:
                if k not in prov:
                    err.append(f"$.provenance.{k}: missing")
            if "checkpoint_fingerprint" in prov and prov["checkpoint_fingerprint"] != data.get("fingerprint"):
                err.append(
                    f"$.provenance.checkpoint_fingerprint: {prov['checkpoint_fingerprint']!r} differs from "
                    f"$.fingerprint {data.get('fingerprint')!r}"
                )
            if "seed" in prov and prov["seed"] is not None and not _is_int(prov["seed"]):
                err.append(f"$.provenance.seed: {prov['seed']!r} must be an integer or null")
            if "date" in prov and not isinstance(prov["date"], str):
                err.append("$.provenance.date: must be a string (ISO 8601)")
            for k in ("versions", "config"):
                if k in prov and not isinstance(prov[k], dict):
                    err.append(f"$.provenance.{k}: must be an object")
    eps = data.get("episodes")
    n_ok = 0
    succ = 0
    tasks: set[int] = set()
    if "episodes" in data:
        if not isinstance(eps, list) or not eps:
            err.append("$.episodes: must be a non-empty list")
            eps = []
        seen: set[tuple] = set()
        for i, e in enumerate(eps):
            where = f"$.episodes[{i}]"
            if not isinstance(e, dict):
                err.append(f"{where}: must be an object")
                continue
            bad = False
            for k in e:
                if k not in ("suite", "task_id", "trial", "seed", "success", "steps"):
                    err.append(f"{where}.{k}: unknown key")
                    bad = True
            for k in ("suite", "task_id", "trial", "seed", "success"):
                if k not in e:
                    err.append(f"{where}.{k}: missing")
                    bad = True
            if bad:
                continue
            if e["suite"] != data.get("suite"):
                err.append(f"{where}.suite: {e['suite']!r} differs from $.suite {data.get('suite')!r}")
            for k in ("task_id", "trial", "seed"):
                if not _is_int(e[k]) or e[k] < 0:
                    err.append(f"{where}.{k}: {e[k]!r} must be a non-negative integer")
                    bad = True
            if not isinstance(e["success"], bool):
                err.append(f"{where}.success: {e['success']!r} must be true or false")
                bad = True
            st = e.get("steps")
            if st is not None and (not _is_int(st) or st < 0):
                err.append(f"{where}.steps: {st!r} must be a non-negative integer or null")
            if bad:
                continue
            key = (e["suite"], e["task_id"], e["trial"], e["seed"])
            if key in seen:
                err.append(f"{where}: duplicate episode {key}")
                continue
            seen.add(key)
            n_ok += 1
            succ += e["success"]
            tasks.add(e["task_id"])
    summ = data.get("summary")
    if "summary" in data:
        if not isinstance(summ, dict):
            err.append("$.summary: must be an object")
        elif n_ok and n_ok == len(eps):
            expect = {"episodes": n_ok, "successes": succ, "tasks": len(tasks)}
            for k, v in expect.items():
                if summ.get(k) != v:
                    err.append(f"$.summary.{k}: {summ.get(k)!r} but the episodes say {v} (edited by hand?)")
            rate = summ.get("success_rate")
            if not _is_num(rate) or abs(rate - succ / n_ok) > 1e-6:
                err.append(f"$.summary.success_rate: {rate!r} but the episodes say {succ / n_ok:.6f}")
    return err


# --------------------------------------------------------------------------------------------
# paths, reading, compatibility
# --------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def golden_path(root: str | Path, fingerprint: str, suite: str) -> Path:
    """``<root>/libero/<fingerprint>/<suite>.json`` (characters outside [A-Za-z0-9._-] become '_')."""
    return Path(root) / "libero" / _safe(fingerprint) / f"{_safe(suite)}.json"


def find_golden(root: str | Path, fingerprint: str, suite: str) -> Path:
    """Locate a suite's golden under the golden root, its libero/ folder or its fingerprint folder."""
    root = Path(root)
    cands = [
        golden_path(root, fingerprint, suite),
        root / _safe(fingerprint) / f"{_safe(suite)}.json",
        root / f"{_safe(suite)}.json",
    ]
    for c in cands:
        if c.is_file():
            return c
    raise GoldenNotFoundError(
        f"no LIBERO golden for suite {suite!r}, fingerprint {fingerprint!r} under {root} "
        f"(looked for {', '.join(str(c) for c in cands)}); create one from an FP run with "
        "--duquant-update-golden"
    )


def read_golden(
    path: str | Path, *, fingerprint: str | None = None, protocol: str | None = None, suite: str | None = None
) -> LiberoGolden:
    """Read and validate a golden; with fingerprint/protocol/suite given, refuse one made for others."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GoldenNotFoundError(f"{p}: golden file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GoldenSchemaError(str(p), [f"cannot read: {e}"]) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GoldenSchemaError(
            str(p), [f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"]
        ) from None
    golden = LiberoGolden.from_dict(data, source=str(p))
    check_compatible(golden, fingerprint=fingerprint, protocol=protocol, suite=suite, source=str(p))
    return golden


def check_compatible(
    golden: LiberoGolden,
    *,
    fingerprint: str | None = None,
    protocol: str | None = None,
    suite: str | None = None,
    source: str = "golden",
) -> None:
    """Raise GoldenMismatchError if the golden was made for another fingerprint / protocol / suite."""
    if fingerprint is not None and golden.fingerprint != fingerprint:
        raise GoldenMismatchError(
            f"{source}: golden is for checkpoint fingerprint {golden.fingerprint!r}, "
            f"the run's is {fingerprint!r}; "
            "a golden only judges runs of the checkpoint it was made from (make one for this checkpoint with "
            "--duquant-update-golden)"
        )
    if protocol is not None and golden.protocol != protocol:
        raise GoldenMismatchError(
            f"{source}: golden follows protocol {golden.protocol!r}, the run follows {protocol!r}; "
            "outcomes of "
            "different protocols are not comparable"
        )
    if suite is not None and golden.suite != suite:
        raise GoldenMismatchError(f"{source}: golden is for suite {golden.suite!r}, the run's is {suite!r}")


# --------------------------------------------------------------------------------------------
# building and writing
# --------------------------------------------------------------------------------------------


def _default_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("pytest-duquant", "torch", "numpy", "hf-libero", "robosuite", "mujoco"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def golden_from_results(
    records: Iterable[EpisodeResult],
    *,
    suite: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    allowed_drop: Mapping[str, float] | None = None,
    protocol: str | None = None,
    seed: int | None = None,
    config: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> LiberoGolden:
    """Build a golden from an FP reference run's results (one suite, one checkpoint, one protocol)."""
    recs = list(records)
    if suite is not None:
        recs = [r for r in recs if r.suite == suite]
    if not recs:
        raise GoldenError(
            f"no results{'' if suite is None else f' for suite {suite!r}'} to build a golden from"
        )
    suites = {r.suite for r in recs}
    if len(suites) != 1:
        raise GoldenError(
            f"results hold several suites {sorted(suites)}: build one golden per suite (suite=...)"
        )
    fps = {r.fingerprint for r in recs}
    if None in fps or len(fps) != 1:
        raise GoldenError(f"results must all name one checkpoint fingerprint, found {sorted(map(str, fps))}")
    protos = {r.protocol for r in recs}
    if protocol is not None:
        protos.discard(None)
        protos.add(protocol)
    if None in protos or len(protos) != 1:
        raise GoldenError(f"results must all name one protocol, found {sorted(map(str, protos))}")
    presets = {(r.preset or "fp").lower() for r in recs}
    if presets != {"fp"}:
        raise GoldenError(
            f"a golden is made from an FP (unquantized) run; these results are preset(s) {sorted(presets)}"
        )
    seen: dict[tuple, EpisodeResult] = {}
    for r in recs:
        if r.key in seen and seen[r.key].success != r.success:
            raise GoldenError(f"episode {r.key} appears twice with different outcomes")
        seen.setdefault(r.key, r)
    eps = tuple(
        GoldenEpisode(r.suite, r.task_id, r.trial, r.seed, r.success, r.steps)
        for r in sorted(seen.values(), key=lambda r: (r.task_id, r.trial, r.seed))
    )
    fp = next(iter(fps))
    seeds = {r.seed for r in recs}
    prov: dict[str, Any] = {
        "checkpoint_fingerprint": fp,
        "seed": seed if seed is not None else (next(iter(seeds)) if len(seeds) == 1 else None),
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "versions": _default_versions(),
        "config": dict(config or {"preset": "fp"}),
    }
    prov.update(provenance or {})
    prov["checkpoint_fingerprint"] = fp
    g = LiberoGolden(
        suite=next(iter(suites)),
        protocol=next(iter(protos)),
        fingerprint=fp,
        alpha=float(alpha),
        allowed_drop=dict(DEFAULT_ALLOWED_DROP if allowed_drop is None else allowed_drop),
        episodes=eps,
        provenance=prov,
    )
    errors = validate_golden(g.to_dict())
    if errors:
        raise GoldenSchemaError("<new golden>", errors)
    return g


def golden_to_json(golden: LiberoGolden) -> str:
    """Stable, diff-friendly text: header keys indented, one episode per line."""
    d = golden.to_dict()
    eps = d.pop("episodes")
    head = json.dumps(d, indent=1, sort_keys=False)
    lines = ",\n  ".join(json.dumps(e, separators=(", ", ": ")) for e in eps)
    return head[:-2] + ',\n "episodes": [\n  ' + lines + "\n ]\n}\n"


def diff_goldens(old: LiberoGolden, new: LiberoGolden) -> list[str]:
    """Human-readable list of what differs between two goldens (empty = same content, provenance aside)."""
    ch: list[str] = []
    for attr in ("suite", "protocol", "fingerprint", "alpha"):
        a, b = getattr(old, attr), getattr(new, attr)
        if a != b:
            ch.append(f"{attr}: {a!r} -> {b!r}")
    if dict(old.allowed_drop) != dict(new.allowed_drop):
        ch.append(f"allowed_drop: {dict(old.allowed_drop)} -> {dict(new.allowed_drop)}")
    o, n = old.outcomes(), new.outcomes()
    added = [k for k in n if k not in o]
    removed = [k for k in o if k not in n]
    flipped = [k for k in n if k in o and n[k] != o[k]]
    if added:
        ch.append(f"{len(added)} episode(s) added, e.g. {added[0]}")
    if removed:
        ch.append(f"{len(removed)} episode(s) removed, e.g. {removed[0]}")
    if flipped:
        ch.append(f"{len(flipped)} outcome(s) changed, e.g. {flipped[0]}: {o[flipped[0]]} -> {n[flipped[0]]}")
    if old.successes != new.successes or len(old.episodes) != len(new.episodes):
        ch.append(
            f"success rate {old.successes}/{len(old.episodes)} ({old.success_rate:.1%}) -> "
            f"{new.successes}/{len(new.episodes)} ({new.success_rate:.1%})"
        )
    return ch


@dataclass(frozen=True)
class GoldenWriteResult:
    path: Path
    written: bool
    backup: Path | None
    changes: list[str]

    def summary(self) -> str:
        if not self.written:
            return f"{self.path}: unchanged"
        if self.backup is None:
            return f"{self.path}: created"
        return f"{self.path}: replaced (previous kept as {self.backup}); " + "; ".join(
            self.changes or ["provenance only"]
        )


def write_golden(path: str | Path, golden: LiberoGolden, *, overwrite: bool = False) -> GoldenWriteResult:
    """Write a golden. Existing file: identical content -> untouched; different -> GoldenExistsError unless
    overwrite=True, in which case the old file is kept as ``<name>.<UTC time>.bak``; the changes are
    returned."""
    p = Path(path)
    errors = validate_golden(golden.to_dict())
    if errors:
        raise GoldenSchemaError(str(p), errors)
    text = golden_to_json(golden)
    backup = None
    changes: list[str] = []
    if p.exists():
        try:
            old = read_golden(p)
        except GoldenError as e:
            old = None
            changes = [f"previous file was not a valid golden ({str(e).splitlines()[0]})"]
        if old is not None:
            changes = diff_goldens(old, golden)
            if not changes:
                return GoldenWriteResult(p, False, None, [])
        if not overwrite:
            raise GoldenExistsError(p, changes)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        backup = p.with_name(f"{p.name}.{stamp}.bak")
        os.replace(p, backup)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return GoldenWriteResult(p, True, backup, changes)
