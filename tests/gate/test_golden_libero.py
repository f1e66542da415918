from __future__ import annotations

import json

import pytest

from pytest_duquant.golden_libero import (
    DEFAULT_ALLOWED_DROP,
    GoldenError,
    GoldenExistsError,
    GoldenMismatchError,
    GoldenNotFoundError,
    GoldenSchemaError,
    LiberoGolden,
    find_golden,
    golden_from_results,
    golden_path,
    golden_to_json,
    read_golden,
    validate_golden,
    write_golden,
)
from pytest_duquant.results_io import EpisodeResult


def _golden(builders, **kw):
    recs = [EpisodeResult.from_dict(r) for r in builders.make_records(tasks=5, trials=4, **kw)]
    return golden_from_results(recs, config={"preset": "fp", "render": 256})


def test_build_roundtrip_and_human_readable_layout(tmp_path, builders):
    g = _golden(builders)
    assert g.fingerprint == builders.fp and g.protocol == builders.proto and g.suite == "libero_spatial"
    assert len(g.episodes) == 20 and g.provenance["seed"] == 7 and g.provenance["config"]["render"] == 256
    assert dict(g.allowed_drop) == DEFAULT_ALLOWED_DROP
    p = golden_path(tmp_path / "golden", g.fingerprint, g.suite)
    assert p == tmp_path / "golden" / "libero" / builders.fp / "libero_spatial.json"
    res = write_golden(p, g)
    assert res.written and res.backup is None
    text = p.read_text()
    # one episode per line, parseable JSON, schema valid
    ep_lines = [ln for ln in text.splitlines() if ln.strip().startswith('{"suite"')]
    assert len(ep_lines) == 20
    assert validate_golden(json.loads(text)) == []
    g2 = read_golden(p, fingerprint=builders.fp, protocol=builders.proto, suite="libero_spatial")
    assert g2.outcomes() == g.outcomes()
    assert g2.success_rate == pytest.approx(sum(g.outcomes().values()) / 20)
    assert find_golden(tmp_path / "golden", builders.fp, "libero_spatial") == p
    assert golden_to_json(g2) == text


def test_validator_reports_every_problem_with_a_path(builders):
    d = _golden(builders).to_dict()
    d["alpha"] = 0.7
    d["allowed_drop"]["B"] = -0.1
    d["episodes"][3]["success"] = "yes"
    d["episodes"][5] = dict(d["episodes"][4])
    d["provenance"]["checkpoint_fingerprint"] = "other"
    d["bogus"] = 1
    errs = validate_golden(d)
    joined = "\n".join(errs)
    for needle in (
        "$.alpha",
        "$.allowed_drop.B",
        "$.episodes[3].success",
        "$.episodes[5]: duplicate",
        "$.provenance.checkpoint_fingerprint",
        "$.bogus: unknown key",
    ):
        assert needle in joined, needle
    with pytest.raises(GoldenSchemaError) as ei:
        LiberoGolden.from_dict(d, source="x.json")
    assert ei.value.exit_code == 2 and len(ei.value.errors) == len(errs)


def test_hand_edited_summary_is_caught(builders):
    d = _golden(builders).to_dict()
    d["episodes"][0]["success"] = not d["episodes"][0]["success"]
    errs = validate_golden(d)
    assert any("$.summary.successes" in e for e in errs)


def test_refuses_other_fingerprint_or_protocol(tmp_path, builders):
    g = _golden(builders)
    p = write_golden(tmp_path / "g.json", g).path
    with pytest.raises(GoldenMismatchError, match="fingerprint") as ei:
        read_golden(p, fingerprint="sha256-other")
    assert ei.value.exit_code == 2
    with pytest.raises(GoldenMismatchError, match="protocol"):
        read_golden(p, protocol="lerobot-libero-v1")
    with pytest.raises(GoldenMismatchError, match="suite"):
        read_golden(p, suite="libero_goal")


def test_malformed_and_missing_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GoldenSchemaError, match="line 1"):
        read_golden(tmp_path / "bad.json")
    with pytest.raises(GoldenNotFoundError):
        read_golden(tmp_path / "none.json")
    with pytest.raises(GoldenNotFoundError, match="update-golden"):
        find_golden(tmp_path, "fp", "libero_goal")


def test_never_silently_overwrites_and_keeps_a_backup(tmp_path, builders):
    g1 = _golden(builders, rng_seed=1)
    g2 = _golden(builders, rng_seed=2)
    assert g1.outcomes() != g2.outcomes()
    p = tmp_path / "g.json"
    write_golden(p, g1)
    before = p.read_text()
    assert not write_golden(p, g1).written  # identical content: untouched
    with pytest.raises(GoldenExistsError, match="outcome\\(s\\) changed") as ei:
        write_golden(p, g2)
    assert ei.value.exit_code == 2 and p.read_text() == before
    res = write_golden(p, g2, overwrite=True)
    assert res.written and res.backup is not None and res.backup.read_text() == before
    assert any("changed" in c for c in res.changes) and "replaced" in res.summary()
    assert read_golden(p).outcomes() == g2.outcomes()


def test_only_fp_runs_of_one_checkpoint_make_goldens(builders):
    recs = [EpisodeResult.from_dict(r) for r in builders.make_records(tasks=2, trials=2, preset="B")]
    with pytest.raises(GoldenError, match="FP"):
        golden_from_results(recs)
    recs = [EpisodeResult.from_dict(r) for r in builders.make_records(tasks=2, trials=2, fingerprint=None)]
    with pytest.raises(GoldenError, match="fingerprint"):
        golden_from_results(recs)
    a = [EpisodeResult.from_dict(r) for r in builders.make_records(tasks=2, trials=1)]
    b = [EpisodeResult.from_dict(r) for r in builders.make_records(suite="libero_goal", tasks=2, trials=1)]
    with pytest.raises(GoldenError, match="several suites"):
        golden_from_results(a + b)
    assert golden_from_results(a + b, suite="libero_goal").suite == "libero_goal"


def test_allowed_drop_lookup(builders):
    g = _golden(builders)
    assert g.allowed_drop_for("b") == DEFAULT_ALLOWED_DROP["B"]
    with pytest.raises(GoldenMismatchError, match="no allowed drop for preset 'turbo'"):
        g.allowed_drop_for("turbo")
