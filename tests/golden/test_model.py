"""Model goldens: the file format, migration, comparison, the ModelRegression check (fast, synthetic)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from pytest_duquant.config import from_env
from pytest_duquant.golden import model as gm
from pytest_duquant.golden.common import GoldenMismatchError, GoldenNotFoundError, GoldenSchemaError
from pytest_duquant.metrics.records import LayerError, ModelMetrics, OutputError, golden_name, numeric_settings


# ---- goldens ---------------------------------------------------------------------------------------
def _metrics(sqnr=(20.0, 18.0, 25.0), rel=0.02, fingerprint="abc123", preset="B") -> ModelMetrics:
    layers = [
        LayerError(
            name=f"m.layers.{i}.q_proj",
            index=i,
            kind="q_proj",
            shape=[8, 16],
            wbits=4,
            sqnr_db=s,
            rtn_sqnr_db=s - 1.0,
            rows=64,
        )
        for i, s in enumerate(sqnr)
    ]
    out = OutputError(rel, 0.1, [rel / 2, rel], [0.05, 0.1])
    return ModelMetrics(
        model="pi05:dummy",
        fingerprint=fingerprint,
        preset=preset,
        settings=numeric_settings(from_env({}, preset=preset)),
        protocol={"calibration": {"calls": 64}},
        output=out,
        output_rtn=OutputError(rel * 1.1, 0.12, [rel, rel * 1.1], [0.06, 0.12]),
        layers=layers,
        bytes_before=3000,
        bytes_after=900,
        info={"threads": 1},
    )


def test_golden_roundtrip_is_schema_valid_and_human_readable(tmp_path):
    m = _metrics()
    doc = gm.to_golden(m, "B")
    path = gm.write(tmp_path / "abc123" / "B.json", doc)
    text = path.read_text()
    assert text.count("\n") > 40 and '"per_step_rel_l2": [0.01, 0.02]' in text
    assert gm.load(path) == json.loads(text)
    assert gm.compare(gm.load(path), m).ok


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("metrics"), "metrics: must be an object"),
        (lambda d: d.update(schema="other"), "$.schema: 'other', expected"),
        (lambda d: d["layers"][1].update(sqnr_db="x"), "layers[1].sqnr_db: must be a finite number"),
        (lambda d: d["layers"].append(dict(d["layers"][0])), "duplicate layer"),
        (lambda d: d["tolerances"].pop("sqnr_db"), "tolerances.sqnr_db"),
        (lambda d: d["metrics"]["output"].update(rel_l2=-1), "metrics.output.rel_l2"),
    ],
)
def test_golden_schema_errors_name_the_key(tmp_path, mutate, message):
    doc = gm.to_golden(_metrics(), "B")
    mutate(doc)
    p = tmp_path / "g.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(GoldenSchemaError, match=re.escape(message)):
        gm.load(p)


def test_compare_within_tolerance_passes_and_beyond_fails_with_worst_layers_table():
    golden = gm.to_golden(_metrics(), "B")
    near = _metrics(sqnr=(20.1, 17.95, 25.0), rel=0.0205)
    assert gm.compare(golden, near).ok
    bad = _metrics(sqnr=(20.0, 16.5, 25.0), rel=0.03)
    cmp = gm.compare(golden, bad, "g.json")
    assert not cmp.ok
    report = cmp.report()
    assert (
        "m.layers.1.q_proj"
        in report.splitlines()[
            cmp.report()
            .splitlines()
            .index(next(line for line in report.splitlines() if line.startswith("worst layers")))
            + 2
        ]
    )
    assert "<-- beyond tolerance" in report and "-1.50" in report
    assert any("output.rel_l2" in f for f in cmp.failures)
    assert any(f.startswith("mean SQNR") for f in cmp.failures)


def test_each_output_figure_has_its_own_tolerance():
    """max abs (one extreme value) and relative L2 (an average) spread differently: one rtol each."""
    golden = gm.to_golden(_metrics(), "B", {"output_rel_l2_rtol": 0.3, "output_max_abs_rtol": 0.001})
    m = _metrics(rel=0.021)  # rel L2 +5%: within 30%
    m.output.max_abs = 0.1002  # max abs +0.2%: beyond 0.1%
    failures = gm.compare(golden, m).failures
    assert any(f.startswith("output.max_abs") for f in failures)
    assert not any(f.startswith("output.rel_l2") for f in failures)


def test_new_goldens_take_the_tolerances_measured_for_their_precision():
    m = _metrics()
    assert gm.to_golden(m, "B")["tolerances"] == gm.DEFAULT_TOLERANCES  # protocol says no dtype
    m.protocol = {**m.protocol, "dtype": "float64"}
    tol = gm.to_golden(m, "B")["tolerances"]
    assert tol == {**gm.DEFAULT_TOLERANCES, **gm.FLOAT64_TOLERANCES}
    assert tol["output_max_abs_rtol"] < gm.DEFAULT_TOLERANCES["output_rtol"]


def test_an_improvement_beyond_tolerance_also_fails():
    """A layer that silently stopped quantizing looks like an improvement; it must not pass unnoticed."""
    golden = gm.to_golden(_metrics(), "B")
    cmp = gm.compare(golden, _metrics(sqnr=(20.0, 18.0, 60.0)))
    assert not cmp.ok and "+35.00" in cmp.report()


def test_bytes_must_match_exactly():
    golden = gm.to_golden(_metrics(), "B")
    m = _metrics()
    m.bytes_after += 1
    assert any("bytes_after" in f for f in gm.compare(golden, m).failures)


def test_golden_of_another_checkpoint_or_settings_is_never_used(tmp_path):
    m = _metrics()
    doc = gm.to_golden(m, "B")
    other = _metrics(fingerprint="fff000")
    with pytest.raises(GoldenMismatchError, match="fingerprint abc123.*fff000.*never used"):
        gm.compare(doc, other)
    changed = _metrics()
    changed.settings = dict(changed.settings, block=32)
    with pytest.raises(GoldenMismatchError, match="block: golden 64 vs run 32"):
        gm.compare(doc, changed)
    # on disk: the file lives under the fingerprint, another fingerprint finds nothing and says so
    gm.write(gm.path_for(tmp_path, "abc123", "B"), doc)
    assert gm.path_for(tmp_path, "abc123", "B") == tmp_path / "model" / "abc123" / "B.json"
    with pytest.raises(GoldenNotFoundError, match="only for other checkpoint fingerprints \\(abc123\\)"):
        gm.ModelRegression(tmp_path).check(other, "B")


def test_update_rewrites_explicitly_and_says_what_changed(tmp_path):
    update = gm.ModelRegression(tmp_path, update=True)
    first = update.check(_metrics(), "B")
    assert first.updated and "new golden" in first.message
    second = update.check(_metrics(sqnr=(20.0, 16.0, 25.0), rel=0.03), "B")
    assert "mean SQNR 21.000 -> 20.333 dB" in second.message
    assert "1 layer(s) moved by more than 0.3 dB: m.layers.1.q_proj -2.00" in second.message
    assert "output rel L2 0.02 -> 0.03" in second.message
    again = gm.ModelRegression(tmp_path).check(_metrics(sqnr=(20.0, 16.0, 25.0), rel=0.03), "B")
    assert not again.updated and again.comparison.ok
    path = tmp_path / "model" / "abc123" / "B.json"
    before = path.read_text()
    same = update.check(_metrics(sqnr=(20.0, 16.0, 25.0), rel=0.03), "B")
    assert not same.updated and "unchanged" in same.message
    assert path.read_text() == before  # no churn of dates
    assert len(update.messages) == 3


def test_a_moved_figure_fails_the_check_with_the_report(tmp_path):
    gm.ModelRegression(tmp_path, update=True).check(_metrics(), "B")
    with pytest.raises(gm.ModelRegressionError, match="worst layers") as ei:
        gm.ModelRegression(tmp_path).check(_metrics(sqnr=(20.0, 16.5, 25.0)), "B")
    assert isinstance(ei.value, AssertionError)  # a test failure, not unusable input


def test_version_1_goldens_are_migrated_with_their_numbers_untouched(tmp_path):
    """The committed goldens are schema v1: they are read as v2 with the same metrics and layers."""
    doc = gm.to_golden(_metrics(), "B")
    v1 = dict(doc, schema_version=1)
    v1["provenance"] = {"date": "2026-11-24T06:46:05Z", "torch": "2.13.0+cpu", "python": "3.11.7",
                        "machine": "x86_64", "threads": 1, "command": "pytest", "info": {}}
    (tmp_path / "B.json").write_text(json.dumps(v1))
    got = gm.load(tmp_path / "B.json")
    assert got["schema_version"] == 2 and got["metrics"] == doc["metrics"] and got["layers"] == doc["layers"]
    assert got["provenance"]["versions"] == {"torch": "2.13.0+cpu", "python": "3.11.7"}
    assert gm.compare(got, _metrics()).ok


def test_golden_name_follows_the_settings():
    pure = numeric_settings(from_env({}, preset="B"))
    assert golden_name("B", pure, pure) == "B"
    assert golden_name("B", dict(pure, rotation="greedy"), pure) == "B-greedy"
    custom = golden_name("B", dict(pure, block=32), pure)
    assert custom.startswith("B-custom-") and custom != golden_name("B", dict(pure, block=16), pure)


def test_committed_goldens_are_schema_valid():
    from pytest_duquant.golden.common import default_root

    root = default_root() / "model"
    files = sorted(root.glob("*/*.json"))
    assert files, f"no committed model goldens under {root}"
    for f in files:
        doc = gm.load(f)
        assert f.parent.name == doc["fingerprint"] and f.stem == doc["name"]


def test_metrics_dict_roundtrip():
    m = _metrics()
    back = ModelMetrics.from_dict(copy.deepcopy(m.to_dict()))
    assert back.to_dict() == m.to_dict()
