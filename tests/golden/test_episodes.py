"""LIBERO goldens: building from an FP run, the file layout, validation, migration, refusing to overwrite."""

from __future__ import annotations

import json

import pytest

from pytest_duquant.config import ALLOWED_DROP
from pytest_duquant.golden.common import (
    GoldenError,
    GoldenExistsError,
    GoldenMismatchError,
    GoldenNotFoundError,
    GoldenSchemaError,
)
from pytest_duquant.golden.episodes import (
    LiberoGolden,
    dumps,
    find_golden,
    golden_from_results,
    path_for,
    read_golden,
    validate_golden,
    write,
)
from pytest_duquant.results import EpisodeResult
from pytest_duquant.testing import FINGERPRINT, PROTOCOL, make_records


def _records(**kw):
    return [EpisodeResult.from_dict(r) for r in make_records(**{"tasks": 5, "trials": 4, **kw})]


def _golden(**kw):
    return golden_from_results(_records(**kw), config={"preset": "fp", "render": 256})


def test_build_roundtrip_and_human_readable_layout(tmp_path):
    g = _golden()
    assert g.fingerprint == FINGERPRINT and g.protocol == PROTOCOL and g.suite == "libero_spatial"
    assert len(g.episodes) == 20 and g.provenance["seed"] == 7 and g.provenance["config"]["render"] == 256
    assert dict(g.allowed_drop) == ALLOWED_DROP
    assert g.provenance["versions"]["python"] and "device" in g.provenance
    p = path_for(tmp_path / "golden", g.fingerprint, g.suite)
    assert p == tmp_path / "golden" / "libero" / FINGERPRINT / "libero_spatial.json"
    assert path_for(tmp_path / "golden" / "libero", g.fingerprint, g.suite) == p  # the kind folder works too
    res = write(p, g)
    assert res.written and res.created
    text = p.read_text()
    assert len([ln for ln in text.splitlines() if ln.strip().startswith('{"suite"')]) == 20
    assert validate_golden(json.loads(text)) == []
    g2 = read_golden(p, fingerprint=FINGERPRINT, protocol=PROTOCOL, suite="libero_spatial")
    assert g2.outcomes() == g.outcomes() and g2.episodes[0].key == g.episodes[0].key
    assert find_golden(tmp_path / "golden", FINGERPRINT, "libero_spatial") == p
    assert dumps(g2) == text


def test_version_1_files_are_read_and_migrated(tmp_path):
    d = _golden().to_dict()
    d["schema_version"] = 1
    del d["provenance"]["device"], d["provenance"]["machine"]
    (tmp_path / "v1.json").write_text(json.dumps(d))
    g = read_golden(tmp_path / "v1.json")
    assert g.provenance["device"] is None and g.outcomes() == _golden().outcomes()
    d["schema_version"] = 7
    (tmp_path / "v7.json").write_text(json.dumps(d))
    with pytest.raises(GoldenSchemaError, match="schema_version: 7, this version reads \\[1, 2\\]"):
        read_golden(tmp_path / "v7.json")


def test_the_records_env_is_the_golden_provenance():
    recs = [EpisodeResult.from_dict({**r, "env": {"versions": {"torch": "9.9"}, "device": "cuda:0 (H100)"}})
            for r in make_records(tasks=2, trials=2)]
    g = golden_from_results(recs)
    assert g.env["device"] == "cuda:0 (H100)" and g.env["versions"] == {"torch": "9.9"}
    assert g.provenance["env_source"] == "the results' env field"


def test_validator_reports_every_problem_with_a_path():
    d = _golden().to_dict()
    d["alpha"] = 0.7
    d["allowed_drop"]["B"] = -0.1
    d["episodes"][3]["success"] = "yes"
    d["episodes"][5] = dict(d["episodes"][4])
    d["provenance"]["checkpoint_fingerprint"] = "other"
    d["bogus"] = 1
    errs = validate_golden(d)
    joined = "\n".join(errs)
    for needle in ("$.alpha", "$.allowed_drop.B", "$.episodes[3].success", "$.episodes[5]: duplicate",
                   "$.provenance.checkpoint_fingerprint", "$.bogus: unknown key"):
        assert needle in joined, needle
    with pytest.raises(GoldenSchemaError) as ei:
        LiberoGolden.from_dict(d, source="x.json")
    assert ei.value.exit_code == 2 and len(ei.value.errors) == len(errs)


def test_hand_edited_summary_is_caught():
    d = _golden().to_dict()
    d["episodes"][0]["success"] = not d["episodes"][0]["success"]
    assert any("$.summary.successes" in e for e in validate_golden(d))


def test_refuses_other_fingerprint_or_protocol(tmp_path):
    p = write(tmp_path / "g.json", _golden()).path
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
    with pytest.raises(GoldenNotFoundError, match="golden make"):
        find_golden(tmp_path, "fp", "libero_goal")


def test_never_silently_overwrites_and_keeps_a_backup(tmp_path):
    g1, g2 = _golden(rng_seed=1), _golden(rng_seed=2)
    assert g1.outcomes() != g2.outcomes()
    p = tmp_path / "g.json"
    write(p, g1)
    before = p.read_text()
    assert not write(p, g1).written  # identical content: untouched
    with pytest.raises(GoldenExistsError, match="outcome\\(s\\) changed") as ei:
        write(p, g2)
    assert ei.value.exit_code == 2 and p.read_text() == before
    res = write(p, g2, replace=True)
    assert res.written and res.backup is not None and res.backup.read_text() == before
    assert any("changed" in c for c in res.changes) and "replaced" in res.summary()
    assert read_golden(p).outcomes() == g2.outcomes()


def test_only_complete_fp_runs_of_one_checkpoint_make_goldens():
    with pytest.raises(GoldenError, match="FP"):
        golden_from_results(_records(tasks=2, trials=2, preset="B"))
    with pytest.raises(GoldenError, match="fingerprint"):
        golden_from_results(_records(tasks=2, trials=2, fingerprint=None))
    a, b = _records(tasks=2, trials=1), _records(suite="libero_goal", tasks=2, trials=1)
    with pytest.raises(GoldenError, match="several suites"):
        golden_from_results(a + b)
    assert golden_from_results(a + b, suite="libero_goal").suite == "libero_goal"
    killed = _records(tasks=3, trials=3)[:-2]  # the last two episodes never finished
    with pytest.raises(GoldenError, match="incomplete FP run: 2 of the 3 tasks x 3 trials"):
        golden_from_results(killed)
    with pytest.raises(GoldenError, match="incomplete FP run: 30 of the 10 tasks x 5 trials"):
        golden_from_results(_records(tasks=10, trials=2), tasks=range(10), trials=range(5))


def test_allowed_drop_lookup():
    g = _golden()
    assert g.allowed_drop_for("b") == ALLOWED_DROP["B"]
    with pytest.raises(GoldenMismatchError, match="no allowed drop for preset 'turbo'"):
        g.allowed_drop_for("turbo")
