"""LIBERO goldens: the FP reference run's per-episode outcomes, ``golden/libero/<fingerprint>/<suite>.json``.

Human-readable JSON, one episode per line, checked by :func:`validate_golden` (every problem with its JSON
path)::

    {
     "schema": "pytest-duquant/libero-golden",
     "schema_version": 2,
     "suite": "libero_spatial",
     "protocol": "openpi-libero-v1",
     "fingerprint": "<checkpoint fingerprint>",
     "alpha": 0.05,
     "allowed_drop": {"A": 0.03, "B": 0.05, "precision": 0.02, "speed": 0.08},
     "summary": {"episodes": 500, "successes": 494, "success_rate": 0.988, "tasks": 10},
     "provenance": {"checkpoint_fingerprint": "...", "seed": 7, "date": "...", "versions": {...},
                    "device": "cuda:0 (NVIDIA H100)", "machine": "x86_64", "config": {...}},
     "episodes": [
      {"suite": "libero_spatial", "task_id": 0, "trial": 0, "seed": 7, "success": true, "steps": 123},
      ...
     ]
    }

Version 1 files (no ``provenance.device``) are read and migrated. A golden is made from a complete FP run
(:func:`golden_from_results`: one suite, checkpoint and protocol, the full tasks x trials grid) and never
silently replaces a different one (:func:`write`). :class:`SuccessRegression` is the fixture class
(``duquant_success_regression``): ``check(records, suite)`` judges a quantized run against the golden with
the judge it is given, or records the golden from an FP run when updating.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_duquant.config import ALLOWED_DROP
from pytest_duquant.golden.common import (
    GoldenError,
    GoldenMismatchError,
    GoldenNotFoundError,
    GoldenSchemaError,
    WriteResult,
    check_header,
    golden_path,
    kind_root,
    provenance,
    read_document,
    safe_name,
    schema_name,
    write_golden,
)
from pytest_duquant.results import EpisodeKey, EpisodeResult, outcomes

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_PROTOCOL",
    "SCHEMA",
    "SCHEMA_VERSION",
    "LiberoGolden",
    "SuccessRegression",
    "check_complete",
    "diff_goldens",
    "dumps",
    "find_golden",
    "golden_from_results",
    "goldens_for",
    "path_for",
    "read_golden",
    "validate_golden",
    "write",
]

KIND = "libero"
SCHEMA = schema_name(KIND)
SCHEMA_VERSION = 2
DEFAULT_PROTOCOL = "openpi-libero-v1"
DEFAULT_ALPHA = 0.05
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
_PROV_REQUIRED = ("checkpoint_fingerprint", "seed", "date", "versions", "device", "config")
_EPISODE_KEYS = ("suite", "task_id", "trial", "seed", "success", "steps")


def _migrate_v1(data: dict) -> dict:
    """v1 -> v2: provenance gains ``device`` (unknown for v1 files) and ``machine``."""
    prov = dict(data.get("provenance") or {})
    prov.setdefault("device", None)
    prov.setdefault("machine", None)
    return dict(data, schema_version=SCHEMA_VERSION, provenance=prov)


_MIGRATIONS = {1: _migrate_v1, 2: lambda d: d}


@dataclass(frozen=True)
class LiberoGolden:
    suite: str
    protocol: str
    fingerprint: str
    alpha: float
    allowed_drop: Mapping[str, float]
    episodes: tuple[EpisodeResult, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def successes(self) -> int:
        return sum(e.success for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / len(self.episodes)

    @property
    def seeds(self) -> set[int]:
        return {e.seed for e in self.episodes}

    @property
    def env(self) -> dict[str, Any]:
        """The stack and device the reference run was made with (``versions``, ``device``)."""
        return {k: self.provenance.get(k) for k in ("versions", "device", "machine")}

    def outcomes(self) -> dict[EpisodeKey, bool]:
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
                "tasks": len({e.task_id for e in self.episodes}),
            },
            "provenance": dict(self.provenance),
            "episodes": [{k: e[k] for k in _EPISODE_KEYS} for e in self.episodes],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<golden>") -> LiberoGolden:
        data = check_header(data, KIND, _MIGRATIONS, source)
        errors = validate_golden(data)
        if errors:
            raise GoldenSchemaError(source, errors)
        return cls(
            suite=data["suite"],
            protocol=data["protocol"],
            fingerprint=data["fingerprint"],
            alpha=float(data["alpha"]),
            allowed_drop={k: float(v) for k, v in data["allowed_drop"].items()},
            episodes=tuple(EpisodeResult.from_dict(e, f"{source}: episode") for e in data["episodes"]),
            provenance=dict(data["provenance"]),
        )


# ---- validation -----------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_golden(data: Any) -> list[str]:
    """Every schema problem of a parsed (current-version) golden, as 'path: problem' strings (empty = valid)."""
    err: list[str] = []
    if not isinstance(data, dict):
        return [f"$: expected a JSON object, got {type(data).__name__}"]
    err += [f"$.{k}: missing" for k in _TOP_KEYS if k not in data]
    err += [f"$.{k}: unknown key (allowed: {', '.join(_TOP_KEYS)})" for k in data if k not in _TOP_KEYS]
    if "schema" in data and data["schema"] != SCHEMA:
        err.append(f"$.schema: {data['schema']!r}, expected {SCHEMA!r}")
    if "schema_version" in data and data["schema_version"] != SCHEMA_VERSION:
        err.append(f"$.schema_version: {data['schema_version']!r}, expected {SCHEMA_VERSION}")
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
            err += [
                f"$.allowed_drop.{p}: {v!r} must be a number in [0, 1)"
                for p, v in ad.items()
                if not (_is_num(v) and 0 <= v < 1)
            ]
    prov = data.get("provenance")
    if "provenance" in data:
        if not isinstance(prov, dict):
            err.append("$.provenance: must be an object")
        else:
            err += [f"$.provenance.{k}: missing" for k in _PROV_REQUIRED if k not in prov]
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
    n_ok = succ = 0
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
            bad = [f"{where}.{k}: unknown key" for k in e if k not in _EPISODE_KEYS]
            bad += [f"{where}.{k}: missing" for k in _EPISODE_KEYS[:5] if k not in e]
            if bad:
                err += bad
                continue
            if e["suite"] != data.get("suite"):
                err.append(f"{where}.suite: {e['suite']!r} differs from $.suite {data.get('suite')!r}")
            typed = [f"{where}.{k}: {e[k]!r} must be a non-negative integer" for k in ("task_id", "trial", "seed")
                     if not _is_int(e[k]) or e[k] < 0]
            if not isinstance(e["success"], bool):
                typed.append(f"{where}.success: {e['success']!r} must be true or false")
            st = e.get("steps")
            if st is not None and (not _is_int(st) or st < 0):
                err.append(f"{where}.steps: {st!r} must be a non-negative integer or null")
            if typed:
                err += typed
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
            for k, v in {"episodes": n_ok, "successes": succ, "tasks": len(tasks)}.items():
                if summ.get(k) != v:
                    err.append(f"$.summary.{k}: {summ.get(k)!r} but the episodes say {v} (edited by hand?)")
            rate = summ.get("success_rate")
            if not _is_num(rate) or abs(rate - succ / n_ok) > 1e-6:
                err.append(f"$.summary.success_rate: {rate!r} but the episodes say {succ / n_ok:.6f}")
    return err


# ---- paths, reading, compatibility --------------------------------------------------------------------


def path_for(root: str | os.PathLike, fingerprint: str, suite: str) -> Path:
    """``<root>/libero/<fingerprint>/<suite>.json`` (root: the golden/ folder, or its libero/ folder)."""
    return golden_path(root, KIND, fingerprint, suite)


def find_golden(root: str | os.PathLike, fingerprint: str, suite: str) -> Path:
    """A suite's golden under a golden root (``golden/``), its ``libero/`` folder, or its fingerprint folder."""
    root = Path(root)
    cands = [path_for(root, fingerprint, suite), root / safe_name(fingerprint) / f"{safe_name(suite)}.json",
             root / f"{safe_name(suite)}.json"]
    for c in cands:
        if c.is_file():
            return c
    raise GoldenNotFoundError(
        f"no LIBERO golden for suite {suite!r}, fingerprint {fingerprint!r} under {root} "
        f"(looked for {', '.join(str(c) for c in cands)}); make one from an FP run with "
        "`duquant golden make RESULTS.jsonl` or --duquant-update-golden"
    )


def read_golden(
    path: str | os.PathLike, *, fingerprint: str | None = None, protocol: str | None = None,
    suite: str | None = None,
) -> LiberoGolden:
    """Read, migrate and validate a golden; with fingerprint/protocol/suite given, refuse one made for others."""
    golden = LiberoGolden.from_dict(read_document(path), source=str(path))
    check_compatible(golden, fingerprint=fingerprint, protocol=protocol, suite=suite, source=str(path))
    return golden


def check_compatible(
    golden: LiberoGolden, *, fingerprint: str | None = None, protocol: str | None = None,
    suite: str | None = None, source: str = "golden",
) -> None:
    """Raise GoldenMismatchError if the golden was made for another fingerprint / protocol / suite."""
    if fingerprint is not None and golden.fingerprint != fingerprint:
        raise GoldenMismatchError(
            f"{source}: golden is for checkpoint fingerprint {golden.fingerprint!r}, the run's is {fingerprint!r}; "
            "a golden only judges runs of the checkpoint it was made from"
        )
    if protocol is not None and golden.protocol != protocol:
        raise GoldenMismatchError(
            f"{source}: golden follows protocol {golden.protocol!r}, the run follows {protocol!r}; outcomes of "
            "different protocols are not comparable"
        )
    if suite is not None and golden.suite != suite:
        raise GoldenMismatchError(f"{source}: golden is for suite {golden.suite!r}, the run's is {suite!r}")


def goldens_for(records: Iterable[EpisodeResult], root: str | os.PathLike) -> dict[str, LiberoGolden]:
    """The goldens under `root` of every (suite, fingerprint) in the records; suites without one are left out."""
    out = {}
    for suite, fp in sorted({(r.suite, r.fingerprint) for r in records if r.fingerprint}):
        try:
            out[suite] = read_golden(find_golden(root, fp, suite))
        except GoldenError:
            continue
    return out


# ---- building and writing -------------------------------------------------------------------------------


def check_complete(records: Sequence[EpisodeResult], tasks=None, trials=None) -> None:
    """A golden's episodes must be a full grid: every task x trial of one seed (given, or those present)."""
    seeds = {r.seed for r in records}
    if len(seeds) != 1:
        raise GoldenError(f"results mix seeds {sorted(seeds)}: a golden is one seed's episodes")
    want_tasks = sorted({r.task_id for r in records}) if tasks is None else list(tasks)
    want_trials = sorted({r.trial for r in records}) if trials is None else list(trials)
    have = {(r.task_id, r.trial) for r in records}
    missing = [(t, k) for t in want_tasks for k in want_trials if (t, k) not in have]
    if missing:
        t, k = missing[0]
        raise GoldenError(
            f"incomplete FP run: {len(missing)} of the {len(want_tasks)} tasks x {len(want_trials)} trials episodes "
            f"are missing (e.g. task {t} trial {k}); finish the run (rerunning resumes it) before making a golden"
        )


def golden_from_results(
    records: Iterable[EpisodeResult],
    *,
    suite: str | None = None,
    alpha: float = DEFAULT_ALPHA,
    allowed_drop: Mapping[str, float] | None = None,
    protocol: str | None = None,
    config: Mapping[str, Any] | None = None,
    tasks: Sequence[int] | None = None,
    trials: Sequence[int] | None = None,
) -> LiberoGolden:
    """A golden from a complete FP reference run (one suite, checkpoint, protocol and seed; every task x
    trial). Provenance: the stack and device the records name (field ``env``), else this process's."""
    recs = list(records)
    if suite is not None:
        recs = [r for r in recs if r.suite == suite]
    if not recs:
        raise GoldenError(f"no results{'' if suite is None else f' for suite {suite!r}'} to build a golden from")
    suites = {r.suite for r in recs}
    if len(suites) != 1:
        raise GoldenError(f"results hold several suites {sorted(suites)}: build one golden per suite (suite=...)")
    fps = {r.fingerprint for r in recs}
    if None in fps or len(fps) != 1:
        raise GoldenError(f"results must all name one checkpoint fingerprint, found {sorted(map(str, fps))}")
    protos = {r.protocol for r in recs}
    if protocol is not None:
        protos = {protocol if p is None else p for p in protos}
    if None in protos or len(protos) != 1:
        raise GoldenError(f"results must all name one protocol, found {sorted(map(str, protos))}")
    presets = {(r.preset or "fp").lower() for r in recs}
    if presets != {"fp"}:
        raise GoldenError(
            f"a golden is made from an FP (unquantized) run; these results are preset(s) {sorted(presets)}"
        )
    out = outcomes(recs)  # a repeated episode must agree with itself
    by_key = {r.key: r for r in reversed(recs)}
    check_complete(list(by_key.values()), tasks, trials)
    eps = tuple(
        EpisodeResult(k.suite, k.task_id, k.trial, k.seed, out[k], by_key[k].steps)
        for k in sorted(by_key, key=lambda k: (k.task_id, k.trial, k.seed))
    )
    envs = [r.extra.get("env") for r in recs if isinstance(r.extra.get("env"), dict)]
    env = envs[0] if envs else None
    fp = next(iter(fps))
    prov = provenance(
        env,
        checkpoint_fingerprint=fp,
        seed=eps[0].seed,
        env_source="the results' env field" if env else "this process (the results name no env)",
        config=dict(config or {"preset": "fp"}),
    )
    g = LiberoGolden(
        suite=next(iter(suites)),
        protocol=next(iter(protos)),
        fingerprint=fp,
        alpha=float(alpha),
        allowed_drop=dict(ALLOWED_DROP if allowed_drop is None else allowed_drop),
        episodes=eps,
        provenance=prov,
    )
    errors = validate_golden(g.to_dict())
    if errors:
        raise GoldenSchemaError("<new golden>", errors)
    return g


def dumps(golden: LiberoGolden) -> str:
    """Stable, diff-friendly text: header keys indented, one episode per line."""
    d = golden.to_dict()
    eps = d.pop("episodes")
    head = json.dumps(d, indent=1, sort_keys=False)
    lines = ",\n  ".join(json.dumps(e, separators=(", ", ": ")) for e in eps)
    return head[:-2] + ',\n "episodes": [\n  ' + lines + "\n ]\n}\n"


def diff_goldens(old: LiberoGolden, new: LiberoGolden) -> list[str]:
    """What differs between two goldens (empty = the same content, provenance aside)."""
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


def write(path: str | os.PathLike, golden: LiberoGolden, *, replace: bool = False,
          how: str = "--force") -> WriteResult:
    """Write a golden. The same content leaves the file untouched; a different golden is replaced only with
    replace=True (the old one kept as ``<name>.<UTC>.bak``), else GoldenExistsError listing the changes."""
    errors = validate_golden(golden.to_dict())
    if errors:
        raise GoldenSchemaError(str(path), errors)

    def changes() -> list[str] | None:
        try:
            return diff_goldens(read_golden(path), golden)
        except GoldenError:
            return None

    return write_golden(path, dumps(golden), changes=changes, replace=replace, backup=True, how=how)


# ---- the fixture class --------------------------------------------------------------------------------


class SuccessRegressionError(GoldenError, AssertionError):
    """The judged run is not a PASS (a test failure; the message is the judgement)."""


class SuccessRegression:
    """The LIBERO golden check of a test: ``check(records, suite, preset)``.

    Judges the run's records of `suite` against ``<root>/libero/<fingerprint>/<suite>.json`` with `judge`
    (``judge(records, goldens, preset=...) -> Judgement``; the plugin passes pytest_duquant.judge.judge
    with the session's options: the same call as ``duquant gate``) and raises SuccessRegressionError
    unless it is a PASS. With ``update=True`` the records must be a complete FP run: they become the
    golden (a different one is replaced, kept as .bak), and what changed is returned.
    """

    def __init__(self, root: str | os.PathLike, *, update: bool = False,
                 judge: Callable[..., Any] | None = None):
        self.root = Path(root)
        self.update = update
        self.judge = judge
        self.messages: list[str] = []

    def check(
        self,
        records: Sequence[EpisodeResult],
        suite: str,
        *,
        preset: str | None = None,
        tasks: Sequence[int] | None = None,
        trials: Sequence[int] | None = None,
        reference: Sequence[EpisodeResult] | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        """Judge (or, updating, record) the run's episodes of `suite`; tasks x trials is the run's declared
        plan (an episode of it missing from the records is never a pass); `reference`: the same-machine FP
        arm (the golden then checks its drift)."""
        __tracebackhide__ = True
        recs = [r for r in records if r.suite == suite]
        if self.update:
            golden = golden_from_results(recs, suite=suite, tasks=tasks, trials=trials, config=config)
            result = write(path_for(self.root, golden.fingerprint, suite), golden, replace=True)
            self.messages.append(result.summary())
            return result
        if self.judge is None:
            raise GoldenError("SuccessRegression needs a judge (the plugin's fixture passes one)")
        judgement = self.judge(
            recs, kind_root(self.root, KIND), preset=preset, tasks=tasks, trials=trials, reference=reference
        )
        if judgement.exit_code != 0:
            raise SuccessRegressionError(judgement.text())
        return judgement
