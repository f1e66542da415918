"""Model goldens: ``golden/model/<fingerprint>/<name>.json``, the measured model metrics with tolerances.

``<name>`` is the preset when the settings in force are the preset's own; ``<preset>-<rotation>`` when only
the rotation differs (e.g. ``B-greedy``); ``<preset>-custom-<hash8>`` otherwise (``metrics.records.
golden_name``). A golden is only ever compared with a run of the same checkpoint fingerprint, the same
numeric settings and the same measurement protocol; anything else is a GoldenMismatchError saying what
differs.

Comparison (`compare`): every figure must lie within its tolerance of the golden, in both directions
(a sudden "improvement", e.g. a layer that silently stopped quantizing, is as suspicious as a regression):
- output/action error (relative L2, max abs; final and per denoising step): |now - golden| <= rtol * golden,
  with one rtol per figure (`output_rel_l2_rtol`, `output_max_abs_rtol`; `output_rtol` when absent);
- per-layer SQNR (DuQuant and RTN): |now - golden| <= sqnr_db; mean over layers: <= mean_sqnr_db;
- packed bytes: exact.
Failures come with a table of the worst layers (name, SQNR now vs golden).

:class:`ModelRegression` is the fixture class (``duquant_model_regression``): ``check(metrics, name)``
compares, or rewrites the file when updating (``--duquant-update-golden``), saying what changed.

Schema version 2 records provenance as every golden kind does (``versions``, ``device``; golden.common);
version-1 files (``provenance.torch``/``python`` at the top) are read and migrated, numbers untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_duquant.golden.common import (
    GoldenError,
    GoldenMismatchError,
    GoldenNotFoundError,
    GoldenSchemaError,
    check_header,
    drift,
    golden_path,
    kind_root,
    provenance,
    read_document,
    schema_name,
    write_atomic,
    write_golden,
)
from pytest_duquant.metrics.records import ModelMetrics, OutputError

KIND = "model"
SCHEMA = schema_name(KIND)
SCHEMA_VERSION = 2
# Tolerances per figure, set from the measured spread of each figure when only the order of float operations
# changes (scripts/golden_spread.py: ATen's AVX512/AVX2/scalar kernels, two MKL code paths, 2 threads instead
# of 1; docs/model-suite.md, "Reproducibility"), never widened to make a run pass. A golden written with
# --duquant-update-golden takes them from `tolerances_for`.
DEFAULT_TOLERANCES = {
    "output_rtol": 0.05,  # relative, for errors of the model output (action chunk / embeddings)
    "output_atol": 1e-6,
    "sqnr_db": 0.3,  # absolute dB, per layer
    "mean_sqnr_db": 0.05,  # absolute dB, mean over layers
}
OPTIONAL_TOLERANCES = ("output_rel_l2_rtol", "output_max_abs_rtol")
# A measurement in float64 (MiniLM; the dummy pi0.5): every figure agreed to 5e-14 relative across the
# float-order variants, so what is left is the golden file's own rounding (6 significant digits for output
# errors: up to 5e-6 relative; 5 for per-layer SQNR: 5e-4 dB), times 4. Measurements in float32/bf16 (a
# full-size checkpoint) keep DEFAULT_TOLERANCES (in float32 the dummy's max abs moved by up to 13%).
FLOAT64_TOLERANCES: dict[str, float] = {
    "output_rtol": 2e-5,
    "output_rel_l2_rtol": 2e-5,
    "output_max_abs_rtol": 2e-5,
    "output_atol": 1e-9,
    "sqnr_db": 0.002,
    "mean_sqnr_db": 0.001,
}


def tolerances_for(metrics: ModelMetrics) -> dict[str, float]:
    """The tolerances a new golden of `metrics` is written with (by the precision it was measured in)."""
    tol = dict(DEFAULT_TOLERANCES)
    if (metrics.protocol or {}).get("dtype") == "float64":
        tol.update(FLOAT64_TOLERANCES)
    return tol


WORST_LAYERS = 12


def _migrate_v1(data: dict) -> dict:
    """v1 -> v2: provenance ``{"torch", "python", "machine", ...}`` -> ``{"versions": {...}, "device", ...}``."""
    prov = dict(data.get("provenance") or {})
    versions = {k: prov.pop(k) for k in ("python", "torch") if k in prov}
    new = dict(data, schema_version=SCHEMA_VERSION)
    new["provenance"] = {"date": prov.pop("date", None), "versions": versions, "device": None, **prov}
    return new


_MIGRATIONS = {1: _migrate_v1, 2: lambda d: d}


def path_for(root: str | os.PathLike, fingerprint: str, name: str) -> Path:
    """``<root>/model/<fingerprint>/<name>.json`` (root: the golden/ folder, or its model/ folder)."""
    return golden_path(root, KIND, fingerprint, name)


# ---- schema -------------------------------------------------------------------------------------
def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(cond: bool, where: str, key: str, problem: str) -> None:
    if not cond:
        raise GoldenSchemaError(where, f"{key}: {problem}")


def _check_output(d: Any, where: str, key: str) -> None:
    _check(isinstance(d, dict), where, key, "must be an object")
    for k in ("rel_l2", "max_abs"):
        _check(_num(d.get(k)) and d[k] >= 0, where, f"{key}.{k}", "must be a finite number >= 0")
    for k in ("per_step_rel_l2", "per_step_max_abs"):
        v = d.get(k, [])
        _check(
            isinstance(v, list) and all(_num(x) and x >= 0 for x in v),
            where,
            f"{key}.{k}",
            "must be a list of finite numbers >= 0",
        )
    _check(
        len(d.get("per_step_rel_l2", [])) == len(d.get("per_step_max_abs", [])),
        where,
        key,
        "per_step_rel_l2 and per_step_max_abs differ in length",
    )


def validate(data: Any, where: str = "golden") -> dict:
    """Check `data` against the schema (an older version is migrated first); returns the current-version
    document. Raises GoldenSchemaError naming the key."""
    data = check_header(data, KIND, _MIGRATIONS, where)
    for k in ("model", "fingerprint", "preset", "name"):
        _check(isinstance(data.get(k), str) and data[k], where, k, "must be a non-empty string")
    for k in ("settings", "protocol", "tolerances", "metrics", "provenance"):
        _check(isinstance(data.get(k), dict), where, k, "must be an object")
    tol = data["tolerances"]
    for k in DEFAULT_TOLERANCES:
        _check(_num(tol.get(k)) and tol[k] >= 0, where, f"tolerances.{k}", "must be a finite number >= 0")
    for k in OPTIONAL_TOLERANCES:
        if k in tol:
            _check(_num(tol[k]) and tol[k] >= 0, where, f"tolerances.{k}", "must be a finite number >= 0")
    m = data["metrics"]
    _check_output(m.get("output"), where, "metrics.output")
    if m.get("output_rtn") is not None:
        _check_output(m["output_rtn"], where, "metrics.output_rtn")
    for k in ("bytes_before", "bytes_after"):
        _check(isinstance(m.get(k), int) and m[k] >= 0, where, f"metrics.{k}", "must be an integer >= 0")
    _check(_num(m.get("mean_sqnr_db")), where, "metrics.mean_sqnr_db", "must be a finite number")
    layers = data.get("layers")
    _check(isinstance(layers, list) and layers, where, "layers", "must be a non-empty list")
    names = set()
    for i, la in enumerate(layers):
        key = f"layers[{i}]"
        _check(isinstance(la, dict), where, key, "must be an object")
        _check(
            isinstance(la.get("name"), str) and la["name"], where, f"{key}.name", "must be a non-empty string"
        )
        _check(la["name"] not in names, where, f"{key}.name", f"duplicate layer {la['name']!r}")
        names.add(la["name"])
        _check(
            isinstance(la.get("shape"), list)
            and len(la["shape"]) == 2
            and all(isinstance(x, int) and x > 0 for x in la["shape"]),
            where,
            f"{key}.shape",
            "must be [out, in] positive integers",
        )
        _check(isinstance(la.get("wbits"), int), where, f"{key}.wbits", "must be an integer")
        _check(_num(la.get("sqnr_db")), where, f"{key}.sqnr_db", "must be a finite number")
        _check(
            la.get("rtn_sqnr_db") is None or _num(la["rtn_sqnr_db"]),
            where,
            f"{key}.rtn_sqnr_db",
            "must be a finite number or null",
        )
    return data


def load(path: str | os.PathLike) -> dict:
    p = Path(path)
    return validate(read_document(p), str(p))


# ---- conversion ---------------------------------------------------------------------------------
def _r(x: float | None, digits: int = 6) -> float | None:
    if x is None:
        return None
    return float(f"{x:.{digits}g}")


def _output_dict(o: OutputError | None) -> dict | None:
    if o is None:
        return None
    return {
        "rel_l2": _r(o.rel_l2),
        "max_abs": _r(o.max_abs),
        "per_step_rel_l2": [_r(x) for x in o.per_step_rel_l2],
        "per_step_max_abs": [_r(x) for x in o.per_step_max_abs],
    }


def to_golden(
    metrics: ModelMetrics, name: str, tolerances: dict | None = None, command: str | None = None
) -> dict:
    """The golden document for `metrics` (validated)."""
    tol = tolerances_for(metrics)
    tol.update(tolerances or {})
    info = dict(metrics.info)
    env = {"versions": {"torch": info.pop("torch", None)}, "device": info.pop("device", "cpu")}
    prov = provenance(None, threads=info.pop("threads", None), command=command, info=info)
    prov["versions"].update({k: v for k, v in env["versions"].items() if v})
    prov["device"] = env["device"]
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": metrics.model,
        "fingerprint": metrics.fingerprint,
        "preset": metrics.preset,
        "name": name,
        "settings": metrics.settings,
        "protocol": metrics.protocol,
        "tolerances": tol,
        "metrics": {
            "output": _output_dict(metrics.output),
            "output_rtn": _output_dict(metrics.output_rtn),
            "mean_sqnr_db": _r(metrics.mean_sqnr_db),
            "mean_rtn_sqnr_db": _r(metrics.mean_rtn_sqnr_db),
            "bytes_before": int(metrics.bytes_before),
            "bytes_after": int(metrics.bytes_after),
        },
        "layers": [
            {
                "name": la.name,
                "shape": list(la.shape),
                "wbits": la.wbits,
                "sqnr_db": _r(la.sqnr_db, 5),
                "rtn_sqnr_db": _r(la.rtn_sqnr_db, 5),
            }
            for la in metrics.layers
        ],
        "provenance": prov,
    }
    return validate(json.loads(json.dumps(doc)), f"golden {name}")


_SCALAR_LIST = re.compile(
    r"\[\s*((?:-?[0-9.eE+-]+|null|true|false)(?:,\s*(?:-?[0-9.eE+-]+|null|true|false))*)\s*\]"
)


def _compact_scalar_lists(text: str) -> str:
    """Put lists of numbers on one line (per-step errors, seeds)."""
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def dumps(doc: dict) -> str:
    """Human-readable text: one layer per line, lists of numbers on one line."""
    body = dict(doc)
    layers = body.pop("layers")
    text = _compact_scalar_lists(json.dumps(body, indent=2, sort_keys=False))
    layer_lines = ",\n".join("    " + json.dumps(la) for la in layers)
    return text[:-2] + ',\n  "layers": [\n' + layer_lines + "\n  ]\n}\n"


def write(path: str | os.PathLike, doc: dict) -> Path:
    """Write atomically, human-readable (one layer per line)."""
    validate(doc, str(path))
    p = Path(path)
    write_atomic(p, dumps(doc))
    return p


# ---- comparison ---------------------------------------------------------------------------------
@dataclass
class LayerDelta:
    name: str
    now: float
    golden: float | None
    rtn_now: float | None
    rtn_golden: float | None

    @property
    def delta(self) -> float:
        return float("nan") if self.golden is None else self.now - self.golden


@dataclass
class Comparison:
    path: str
    failures: list[str] = field(default_factory=list)
    layers: list[LayerDelta] = field(default_factory=list)
    tolerances: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def worst(self, n: int = WORST_LAYERS) -> list[LayerDelta]:
        def key(d: LayerDelta):
            return -abs(d.delta) if d.golden is not None else -math.inf

        return sorted(self.layers, key=key)[:n]

    def table(self, n: int = WORST_LAYERS) -> str:
        tol = self.tolerances.get("sqnr_db", DEFAULT_TOLERANCES["sqnr_db"])
        rows = [
            f"worst layers (SQNR dB, now vs golden; per-layer tolerance +/-{tol} dB):",
            f"  {'layer':<60} {'now':>8} {'golden':>8} {'delta':>8} {'RTN now':>8} {'RTN gold':>8}",
        ]
        for d in self.worst(n):
            g = "-" if d.golden is None else f"{d.golden:8.2f}"
            dl = "-" if d.golden is None else f"{d.delta:+8.2f}"
            rn = "-" if d.rtn_now is None else f"{d.rtn_now:8.2f}"
            rg = "-" if d.rtn_golden is None else f"{d.rtn_golden:8.2f}"
            flag = "  <-- beyond tolerance" if d.golden is not None and abs(d.delta) > tol else ""
            rows.append(f"  {d.name:<60} {d.now:8.2f} {g:>8} {dl:>8} {rn:>8} {rg:>8}{flag}")
        return "\n".join(rows)

    def report(self) -> str:
        head = f"model golden {self.path}: {len(self.failures)} figure(s) beyond tolerance"
        shown = self.failures[:20]
        more = (
            [f"  ... and {len(self.failures) - len(shown)} more"] if len(self.failures) > len(shown) else []
        )
        return "\n".join(
            [
                head,
                *("  " + f for f in shown),
                *more,
                self.table(),
                "If the change is intended, re-record with --duquant-update-golden.",
            ]
        )


def check_applicable(golden: dict, metrics: ModelMetrics, path: str) -> None:
    """Raise GoldenMismatchError unless the golden was recorded for this fingerprint, settings and protocol."""
    if golden["fingerprint"] != metrics.fingerprint:
        raise GoldenMismatchError(
            f"{path}: recorded for checkpoint fingerprint {golden['fingerprint']}, this run's checkpoint is "
            f"{metrics.fingerprint}; a golden of another checkpoint is never used"
        )
    if golden["model"] != metrics.model:
        raise GoldenMismatchError(
            f"{path}: recorded for model {golden['model']!r}, this run measures {metrics.model!r}"
        )
    diff = sorted(
        k
        for k in set(golden["settings"]) | set(metrics.settings)
        if golden["settings"].get(k) != metrics.settings.get(k)
    )
    if diff:
        details = ", ".join(
            f"{k}: golden {golden['settings'].get(k)!r} vs run {metrics.settings.get(k)!r}" for k in diff
        )
        raise GoldenMismatchError(f"{path}: recorded with other DuQuant settings ({details})")
    if golden["protocol"] != json.loads(json.dumps(metrics.protocol)):
        gp, mp = golden["protocol"], json.loads(json.dumps(metrics.protocol))
        keys = sorted(k for k in set(gp) | set(mp) if gp.get(k) != mp.get(k))
        raise GoldenMismatchError(
            f"{path}: recorded with another measurement protocol (differs in {', '.join(keys)}: "
            + "; ".join(f"{k}: golden {gp.get(k)!r} vs run {mp.get(k)!r}" for k in keys)
            + ")"
        )


def _close(now: float, gold: float, rtol: float, atol: float) -> bool:
    return abs(now - gold) <= rtol * abs(gold) + atol


def _compare_output(name: str, now: OutputError | None, gold: dict | None, tol: dict, out: list[str]) -> None:
    if gold is None or now is None:
        if (gold is None) != (now is None):
            out.append(f"{name}: present in {'run' if gold is None else 'golden'} only")
        return
    atol = tol["output_atol"]
    rtols = {k: tol.get(f"output_{k}_rtol", tol["output_rtol"]) for k in ("rel_l2", "max_abs")}
    for key, value in (("rel_l2", now.rel_l2), ("max_abs", now.max_abs)):
        rtol = rtols[key]
        if not _close(value, gold[key], rtol, atol):
            out.append(
                f"{name}.{key}: {value:.6g} vs golden {gold[key]:.6g} "
                f"({(value - gold[key]) / max(abs(gold[key]), 1e-30):+.2%}; tolerance +/-{rtol:.2g} relative)"
            )
    for key, values in (("per_step_rel_l2", now.per_step_rel_l2), ("per_step_max_abs", now.per_step_max_abs)):
        rtol = rtols[key.removeprefix("per_step_")]
        g = gold.get(key, [])
        if len(g) != len(values):
            out.append(f"{name}.{key}: {len(values)} steps vs golden {len(g)}")
            continue
        bad = [i for i, (a, b) in enumerate(zip(values, g, strict=True)) if not _close(a, b, rtol, atol)]
        if bad:
            i = bad[0]
            out.append(
                f"{name}.{key}: {len(bad)} step(s) beyond tolerance, e.g. step {i + 1}: "
                f"{values[i]:.6g} vs golden {g[i]:.6g}"
            )


def compare(golden: dict, metrics: ModelMetrics, path: str = "golden") -> Comparison:
    """Compare a run with its golden (after check_applicable). Never raises for numbers: see .failures."""
    check_applicable(golden, metrics, path)
    tol = dict(DEFAULT_TOLERANCES)
    tol.update(golden["tolerances"])
    cmp = Comparison(path=path, tolerances=tol)
    gl = {la["name"]: la for la in golden["layers"]}
    now_names = [la.name for la in metrics.layers]
    missing, extra = sorted(set(gl) - set(now_names)), sorted(set(now_names) - set(gl))
    if missing:
        cmp.failures.append(
            f"layers: {len(missing)} golden layer(s) not quantized in this run, e.g. {missing[0]}"
        )
    if extra:
        cmp.failures.append(f"layers: {len(extra)} layer(s) quantized but not in the golden, e.g. {extra[0]}")
    beyond = beyond_rtn = 0
    for la in metrics.layers:
        g = gl.get(la.name)
        cmp.layers.append(
            LayerDelta(
                la.name,
                la.sqnr_db,
                None if g is None else g["sqnr_db"],
                la.rtn_sqnr_db,
                None if g is None else g.get("rtn_sqnr_db"),
            )
        )
        if g is None:
            continue
        if abs(la.sqnr_db - g["sqnr_db"]) > tol["sqnr_db"]:
            beyond += 1
        if (
            la.rtn_sqnr_db is not None
            and g.get("rtn_sqnr_db") is not None
            and abs(la.rtn_sqnr_db - g["rtn_sqnr_db"]) > tol["sqnr_db"]
        ):
            beyond_rtn += 1
    if beyond:
        cmp.failures.append(
            f"per-layer SQNR: {beyond} of {len(metrics.layers)} layer(s) moved by more than "
            f"{tol['sqnr_db']} dB"
        )
    if beyond_rtn:
        cmp.failures.append(
            f"per-layer RTN SQNR (baseline): {beyond_rtn} layer(s) moved by more than {tol['sqnr_db']} dB"
        )
    gm = golden["metrics"]
    if abs(metrics.mean_sqnr_db - gm["mean_sqnr_db"]) > tol["mean_sqnr_db"]:
        cmp.failures.append(
            f"mean SQNR: {metrics.mean_sqnr_db:.3f} dB vs golden {gm['mean_sqnr_db']:.3f} dB "
            f"({metrics.mean_sqnr_db - gm['mean_sqnr_db']:+.3f}; tolerance +/-{tol['mean_sqnr_db']})"
        )
    _compare_output("output", metrics.output, gm["output"], tol, cmp.failures)
    _compare_output("output_rtn", metrics.output_rtn, gm.get("output_rtn"), tol, cmp.failures)
    for key in ("bytes_before", "bytes_after"):
        if getattr(metrics, key) != gm[key]:
            cmp.failures.append(f"{key}: {getattr(metrics, key)} vs golden {gm[key]} (must be equal)")
    return cmp


def describe_changes(old: dict | None, new: dict) -> str:
    """What an update changes (printed by --duquant-update-golden)."""
    name = f"{new['fingerprint']}/{new['name']}.json"
    if old is None:
        return (
            f"{name}: new golden (mean SQNR {new['metrics']['mean_sqnr_db']:.3f} dB, output rel L2 "
            f"{new['metrics']['output']['rel_l2']:.6g}, {len(new['layers'])} layers)"
        )
    lines = [f"{name}: updated"]
    om, nm = old["metrics"], new["metrics"]
    if old.get("settings") != new.get("settings"):
        lines.append("  settings changed")
    if old.get("protocol") != new.get("protocol"):
        lines.append("  protocol changed")
    lines.append(f"  mean SQNR {om['mean_sqnr_db']:.3f} -> {nm['mean_sqnr_db']:.3f} dB")
    lines.append(
        f"  output rel L2 {om['output']['rel_l2']:.6g} -> {nm['output']['rel_l2']:.6g}; max abs "
        f"{om['output']['max_abs']:.6g} -> {nm['output']['max_abs']:.6g}"
    )
    if om.get("output_rtn") and nm.get("output_rtn"):
        lines.append(
            f"  RTN output rel L2 {om['output_rtn']['rel_l2']:.6g} -> {nm['output_rtn']['rel_l2']:.6g}"
        )
    if (om["bytes_before"], om["bytes_after"]) != (nm["bytes_before"], nm["bytes_after"]):
        lines.append(
            f"  bytes {om['bytes_before']}->{om['bytes_after']} became "
            f"{nm['bytes_before']}->{nm['bytes_after']}"
        )
    ol = {la["name"]: la for la in old["layers"]}
    moved = sorted(
        ((la["sqnr_db"] - ol[la["name"]]["sqnr_db"], la["name"]) for la in new["layers"] if la["name"] in ol),
        key=lambda t: -abs(t[0]),
    )
    tol = new["tolerances"]["sqnr_db"]
    big = [m for m in moved if abs(m[0]) > tol]
    lines.append(
        f"  {len(big)} layer(s) moved by more than {tol} dB"
        + (": " + ", ".join(f"{n} {d:+.2f}" for d, n in big[:5]) if big else "")
    )
    added = set(la["name"] for la in new["layers"]) ^ set(ol)
    if added:
        lines.append(f"  {len(added)} layer name(s) added/removed")
    return "\n".join(lines)


def _same_numbers(a: dict, b: dict) -> bool:
    keys = (
        "model",
        "fingerprint",
        "preset",
        "name",
        "settings",
        "protocol",
        "tolerances",
        "metrics",
        "layers",
    )
    return all(a.get(k) == b.get(k) for k in keys)


@dataclass
class GoldenResult:
    path: Path
    updated: bool
    message: str
    comparison: Comparison | None = None


class ModelRegressionError(GoldenError, AssertionError):
    """A figure moved beyond its tolerance (a test failure, not unusable input)."""


class ModelRegression:
    """The model-golden check of a test: ``check(metrics, name)``.

    Compares with ``<root>/model/<fingerprint>/<name>.json`` (raising ModelRegressionError with the
    worst-layers table when a figure moved beyond tolerance), or, with ``update=True``, records the
    measurement there (unchanged numbers leave the file untouched) and returns what changed. A missing
    golden or one of another checkpoint/settings/protocol raises a GoldenError saying so.
    """

    def __init__(self, root: str | os.PathLike, *, update: bool = False, command: str | None = None):
        self.root = Path(root)
        self.update = update
        self.command = command
        self.messages: list[str] = []  # what updates wrote, for the session summary

    def path(self, metrics: ModelMetrics, name: str) -> Path:
        return path_for(self.root, metrics.fingerprint, name)

    def check(self, metrics: ModelMetrics, name: str) -> GoldenResult:
        __tracebackhide__ = True
        result = self.record(metrics, name) if self.update else self.compare(metrics, name)
        if result.comparison is not None and not result.comparison.ok:
            raise ModelRegressionError(result.message)
        return result

    def record(self, metrics: ModelMetrics, name: str) -> GoldenResult:
        path = self.path(metrics, name)
        old = None
        if path.is_file():
            try:
                old = load(path)
            except GoldenSchemaError:
                old = None
        doc = to_golden(metrics, name, command=self.command)  # tolerances: tolerances_for(metrics), the spread
        written = write_golden(
            path, dumps(doc), changes=lambda: None if old is None else ([] if _same_numbers(old, doc) else ["numbers"]),
            replace=True,
        )
        if not written.written:
            message = f"{path}: unchanged (same numbers; file left as it is)"
        else:
            message = describe_changes(old, doc)
        self.messages.append(message)
        return GoldenResult(path, written.written, message)

    def compare(self, metrics: ModelMetrics, name: str) -> GoldenResult:
        path = self.path(metrics, name)
        if not path.is_file():
            raise GoldenNotFoundError(_missing_message(self.root, path, metrics, name))
        golden = load(path)
        cmp = compare(golden, metrics, str(path))
        if cmp.ok:
            return GoldenResult(path, False, "ok", cmp)
        moved = drift(golden["provenance"], {"versions": {"torch": metrics.info.get("torch")},
                                             "device": metrics.info.get("device", "cpu")})
        note = f"\n(the golden was made on another stack: {'; '.join(moved)})" if moved else ""
        return GoldenResult(path, False, cmp.report() + note, cmp)


def _missing_message(root: Path, path: Path, metrics: ModelMetrics, name: str) -> str:
    model_root = kind_root(root, KIND)
    others = sorted(p.name for p in model_root.iterdir() if p.is_dir()) if model_root.is_dir() else []
    other_note = ""
    if path.parent.is_dir():
        have = sorted(p.stem for p in path.parent.glob("*.json"))
        other_note = f"; goldens of this checkpoint: {', '.join(have) or 'none'}"
    elif others:
        other_note = (
            f"; goldens exist only for other checkpoint fingerprints ({', '.join(others[:6])}) and "
            "are never used for this one"
        )
    return (
        f"no model golden {path} (checkpoint fingerprint {metrics.fingerprint}, settings "
        f"{name}){other_note}. Record it with --duquant-update-golden."
    )


def recorded_rtn_relation(
    root: str | os.PathLike, metrics: ModelMetrics, name: str
) -> tuple[float, float, Path] | None:
    """(mean SQNR, mean RTN SQNR, path) recorded in the committed golden for this run (same fingerprint,
    settings and protocol), or None when there is no such golden or it has no RTN figures."""
    path = path_for(root, metrics.fingerprint, name)
    if not path.is_file():
        return None
    try:
        doc = load(path)
        check_applicable(doc, metrics, str(path))
    except GoldenError:
        return None
    m = doc["metrics"]
    if m.get("mean_rtn_sqnr_db") is None:
        return None
    return float(m["mean_sqnr_db"]), float(m["mean_rtn_sqnr_db"]), path
