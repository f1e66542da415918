from __future__ import annotations

import json

import pytest

from pytest_duquant.results_io import (
    EpisodeResult,
    ResultsFormatError,
    ResultsTruncatedWarning,
    outcomes,
    read_results,
)


def test_reads_records_and_keys(tmp_path, builders):
    recs = builders.make_records(tasks=3, trials=2)
    p = builders.write_jsonl(tmp_path / "r.jsonl", recs)
    out = read_results(p)
    assert len(out) == 6
    assert out[0].key == ("libero_spatial", 0, 0, 7)
    assert out[4].key == ("libero_spatial", 1, 1, 7)
    assert out[0].fingerprint == builders.fp and out[0].protocol == builders.proto
    assert [r.success for r in out] == [r["success"] for r in recs]


def test_truncated_last_line_of_a_killed_run_is_dropped_with_a_warning(tmp_path, builders):
    recs = builders.make_records(tasks=3, trials=1)
    p = builders.write_jsonl(tmp_path / "r.jsonl", recs, tail='{"suite": "libero_spatial", "task_')
    with pytest.warns(ResultsTruncatedWarning, match=r"r.jsonl:4"):
        out = read_results(p)
    assert len(out) == 3
    with pytest.raises(ResultsFormatError, match=r"r.jsonl:4"):
        read_results(p, on_truncated="error")


def test_malformed_middle_line_names_file_and_line(tmp_path, builders):
    recs = builders.make_records(tasks=4, trials=1)
    lines = [json.dumps(r) for r in recs]
    lines[2] = lines[2][:-5]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsFormatError, match=r"r.jsonl:3: not valid JSON"):
        read_results(tmp_path / "r.jsonl")


def test_terminated_but_broken_last_line_is_an_error(tmp_path, builders):
    recs = builders.make_records(tasks=2, trials=1)
    p = builders.write_jsonl(tmp_path / "r.jsonl", recs, tail="{oops\n")
    with pytest.raises(ResultsFormatError, match=r"r.jsonl:3"):
        read_results(p)


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("success", "yes", "success='yes'"),
        ("task_id", -1, "task_id=-1"),
        ("trial", 1.5, "trial=1.5"),
        ("suite", "", "suite=''"),
    ],
)
def test_bad_fields_are_named(tmp_path, builders, field, value, msg):
    recs = builders.make_records(tasks=2, trials=1)
    recs[1][field] = value
    p = builders.write_jsonl(tmp_path / "r.jsonl", recs)
    with pytest.raises(ResultsFormatError, match=r"r.jsonl:2: " + msg.replace("(", r"\(")):
        read_results(p)


def test_missing_required_field(tmp_path, builders):
    recs = builders.make_records(tasks=2, trials=1)
    del recs[0]["seed"]
    with pytest.raises(ResultsFormatError, match="r.jsonl:1: missing field\\(s\\) seed"):
        read_results(builders.write_jsonl(tmp_path / "r.jsonl", recs))


def test_aliases_extra_and_directory(tmp_path, builders):
    rec = {
        "suite": "s",
        "task": 2,
        "trial": 0,
        "seed": 1,
        "success": 1,
        "checkpoint_fingerprint": "f",
        "wall_time": 3.0,
        "video": "x.mp4",
    }
    (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(dict(rec, trial=1, success=False)) + "\n")
    out = read_results(tmp_path)
    assert [r.key for r in out] == [("s", 2, 0, 1), ("s", 2, 1, 1)]
    assert out[0].success is True and out[0].fingerprint == "f" and out[0].wall_s == 3.0
    assert out[0].extra == {"video": "x.mp4"}
    assert EpisodeResult.from_dict(out[0].to_dict()) == out[0]


def test_missing_file_and_empty_dir(tmp_path):
    with pytest.raises(ResultsFormatError, match="not found"):
        read_results(tmp_path / "nope.jsonl")
    with pytest.raises(ResultsFormatError, match="no \\*.jsonl"):
        read_results(tmp_path)


def test_outcomes_dedupes_repeats_and_rejects_conflicts():
    a = EpisodeResult("s", 0, 0, 7, True)
    b = EpisodeResult("s", 0, 1, 7, False)
    assert outcomes([a, b, a]) == {("s", 0, 0, 7): True, ("s", 0, 1, 7): False}
    with pytest.raises(ResultsFormatError, match="different outcomes"):
        outcomes([a, EpisodeResult("s", 0, 0, 7, False)])
