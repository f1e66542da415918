"""What every kind of golden shares: errors, where files live, the schema header, provenance, writing.

Layout: ``<root>/<kind>/<fingerprint>/<name>.json`` with ``<root>`` the repository's ``golden/`` folder
(``default_root``), ``<kind>`` ``model`` or ``libero``. Every file starts with the header
``{"schema": "pytest-duquant/<kind>-golden", "schema_version": N}``; a reader accepts the versions it can
migrate. Provenance records who made a golden, when, with which software and on which device
(:func:`provenance`); :func:`drift` says how two of those differ. Writing is atomic and explicit: a
different golden is replaced only when asked (:func:`write_golden`), and the change list says what moved.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_duquant.results import environment

__all__ = [
    "GoldenError",
    "GoldenExistsError",
    "GoldenMismatchError",
    "GoldenNotFoundError",
    "GoldenSchemaError",
    "WriteResult",
    "default_root",
    "drift",
    "golden_path",
    "kind_root",
    "provenance",
    "read_document",
    "safe_name",
    "write_golden",
]

KINDS = ("model", "libero")


# ---- one error hierarchy ---------------------------------------------------------------------------


class GoldenError(Exception):
    """Any problem with a golden file; the CLI maps it to exit code 2 (unusable input)."""

    exit_code = 2


class GoldenSchemaError(GoldenError, ValueError):
    """The file is not a valid golden; ``errors`` lists every problem with its JSON path."""

    def __init__(self, source: str, errors: list[str] | str):
        self.source = source
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        shown = "\n  ".join(self.errors[:20])
        more = f"\n  ... and {len(self.errors) - 20} more" if len(self.errors) > 20 else ""
        super().__init__(f"{source}: invalid golden ({len(self.errors)} problem(s)):\n  {shown}{more}")


class GoldenMismatchError(GoldenError, ValueError):
    """The golden belongs to another checkpoint, settings, protocol or suite than the run: never compared."""


class GoldenNotFoundError(GoldenError, FileNotFoundError):
    """No golden where one was expected."""


class GoldenExistsError(GoldenError, FileExistsError):
    """Writing would replace a different golden and that was not asked for."""

    def __init__(self, path: Path, changes: list[str], how: str = "--force"):
        self.path = path
        self.changes = changes
        super().__init__(
            f"{path}: a different golden exists; replace it with {how}. Changes:\n  " + "\n  ".join(changes)
        )


# ---- where goldens live -------------------------------------------------------------------------------


def safe_name(name: str) -> str:
    """Characters outside [A-Za-z0-9._-] become '_' (fingerprints and names are file names)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name))


def default_root(start: str | os.PathLike | None = None) -> Path:
    """The nearest ``golden/`` folder holding a ``model/`` or ``libero/`` folder above `start` (else above
    this package, else the current directory); ``<start or cwd>/golden`` when there is none."""
    bases = [Path(start).resolve()] if start is not None else []
    bases += [Path(__file__).resolve().parents[2], Path.cwd()]
    for base in bases:
        for d in (base, *base.parents):
            if any((d / "golden" / k).is_dir() for k in KINDS):
                return d / "golden"
    return bases[0] / "golden"


def kind_root(root: str | os.PathLike, kind: str) -> Path:
    """``<root>/<kind>``; a root that already is a ``<kind>`` folder is taken as it is."""
    root = Path(root)
    return root if root.name == kind else root / kind


def golden_path(root: str | os.PathLike, kind: str, fingerprint: str, name: str) -> Path:
    return kind_root(root, kind) / safe_name(fingerprint) / f"{safe_name(name)}.json"


# ---- header, reading ----------------------------------------------------------------------------------


def schema_name(kind: str) -> str:
    return f"pytest-duquant/{kind}-golden"


def read_document(path: str | os.PathLike) -> Any:
    """Parsed JSON of a golden file; missing -> GoldenNotFoundError, unreadable -> GoldenSchemaError."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GoldenNotFoundError(f"{p}: golden file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GoldenSchemaError(str(p), f"cannot read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GoldenSchemaError(str(p), f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def check_header(data: Any, kind: str, readable: Mapping[int, Callable[[dict], dict]], source: str) -> dict:
    """Check the header and migrate an older version. ``readable`` maps each version this code reads to
    its migration to the current one (identity for the current version). -> the migrated document."""
    if not isinstance(data, dict):
        raise GoldenSchemaError(source, f"$: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != schema_name(kind):
        raise GoldenSchemaError(source, f"$.schema: {data.get('schema')!r}, expected {schema_name(kind)!r}")
    version = data.get("schema_version")
    if version not in readable:
        raise GoldenSchemaError(
            source, f"$.schema_version: {version!r}, this version reads {sorted(readable)}"
        )
    return readable[version](data)


# ---- provenance and drift -------------------------------------------------------------------------------


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def provenance(env: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """``{"date", "versions", "device", "machine", **extra}``: `env` is what produced the measured numbers
    (e.g. the rollouts' ``env`` field); default: this process on the CPU."""
    env = dict(env) if env else environment()
    return {
        "date": utc_now(),
        "versions": dict(env.get("versions") or {}),
        "device": env.get("device"),
        "machine": env.get("machine"),
        **extra,
    }


#: the versions whose change can move the numbers (a golden's python patch level does not)
DRIFT_PACKAGES = ("torch", "numpy", "mujoco", "robosuite", "hf-libero", "libero", "triton")


def drift(golden: Mapping[str, Any] | None, run: Mapping[str, Any] | None) -> list[str]:
    """How the run's stack/device differs from the golden's (both ``{"versions", "device", ...}``):
    one line per difference, empty when they agree or either side is unknown."""
    if not golden or not run:
        return []
    out = []
    gd, rd = golden.get("device"), run.get("device")
    if gd and rd and str(gd) != str(rd):
        out.append(f"device: golden {gd}, run {rd}")
    gv, rv = golden.get("versions") or {}, run.get("versions") or {}
    for pkg in DRIFT_PACKAGES:
        if pkg in gv and pkg in rv and gv[pkg] != rv[pkg]:
            out.append(f"{pkg}: golden {gv[pkg]}, run {rv[pkg]}")
    return out


# ---- writing ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteResult:
    path: Path
    written: bool
    changes: list[str] = field(default_factory=list)
    backup: Path | None = None
    created: bool = False

    def summary(self) -> str:
        if not self.written:
            return f"{self.path}: unchanged"
        if self.created:
            return f"{self.path}: created"
        kept = f" (previous kept as {self.backup})" if self.backup else ""
        return f"{self.path}: replaced{kept}; " + "; ".join(self.changes or ["provenance only"])


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_golden(
    path: str | os.PathLike,
    text: str,
    *,
    changes: Callable[[], list[str] | None],
    replace: bool = False,
    backup: bool = False,
    how: str = "--force",
) -> WriteResult:
    """Write a golden's text. ``changes()`` compares with the existing file: None = there is none (or it is
    unreadable), [] = the same content (the file is left untouched, no churn of dates), else the list of
    what differs: then the file is replaced only with ``replace=True`` (kept as ``<name>.<UTC>.bak`` with
    ``backup=True``), otherwise GoldenExistsError naming `how` to replace it."""
    p = Path(path)
    old = changes() if p.exists() else None
    if old is not None and not old:
        return WriteResult(p, False)
    kept = None
    if p.exists():
        diff = old if old is not None else ["the previous file is not a valid golden"]
        if not replace:
            raise GoldenExistsError(p, diff, how)
        if backup:
            kept = p.with_name(f"{p.name}.{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S%fZ}.bak")
            os.replace(p, kept)
        write_atomic(p, text)
        return WriteResult(p, True, diff, kept)
    write_atomic(p, text)
    return WriteResult(p, True, [], None, created=True)
