"""The one reader: records, keys, aliases, truncated and malformed lines, outcomes."""

from __future__ import annotations

import json

import pytest

from pytest_duquant.results import (
    EpisodeKey,
    EpisodeResult,
    ResultsError,
    ResultsTruncatedWarning,
    outcomes,
    read_results,
)
from pytest_duquant.testing import FINGERPRINT, PROTOCOL, make_records, write_jsonl


def test_reads_records_and_keys(tmp_path):
    recs = make_records(tasks=3, trials=2)
    p = write_jsonl(tmp_path / "r.jsonl", recs)
    out = read_results(p)
    assert len(out) == 6
    assert out[0].key == ("libero_spatial", 0, 0, 7) == EpisodeKey("libero_spatial", 0, 0, 7)
    assert str(out[0].key) == "libero_spatial/task0/trial0/seed7"
    assert out[4].key == ("libero_spatial", 1, 1, 7)
    assert out[0].fingerprint == FINGERPRINT and out[0].protocol == PROTOCOL
    assert [r.success for r in out] == [r["success"] for r in recs]


def test_truncated_last_line_of_a_killed_run_is_dropped_with_a_warning(tmp_path):
    recs = make_records(tasks=3, trials=1)
    p = write_jsonl(tmp_path / "r.jsonl", recs, tail='{"suite": "libero_spatial", "task_')
    with pytest.warns(ResultsTruncatedWarning, match=r"r.jsonl:4"):
        out = read_results(p)
    assert len(out) == 3
    with pytest.raises(ResultsError, match=r"r.jsonl:4"):
        read_results(p, on_truncated="error")


def test_malformed_middle_line_names_file_and_line(tmp_path):
    recs = make_records(tasks=4, trials=1)
    lines = [json.dumps(r) for r in recs]
    lines[2] = lines[2][:-5]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError, match=r"r.jsonl:3: not valid JSON"):
        read_results(tmp_path / "r.jsonl")


def test_terminated_but_broken_last_line_is_an_error(tmp_path):
    recs = make_records(tasks=2, trials=1)
    p = write_jsonl(tmp_path / "r.jsonl", recs, tail="{oops\n")
    with pytest.raises(ResultsError, match=r"r.jsonl:3"):
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
def test_bad_fields_are_named(tmp_path, field, value, msg):
    recs = make_records(tasks=2, trials=1)
    recs[1][field] = value
    p = write_jsonl(tmp_path / "r.jsonl", recs)
    with pytest.raises(ResultsError, match=r"r.jsonl:2: " + msg.replace("(", r"\(")):
        read_results(p)


def test_missing_required_field(tmp_path):
    recs = make_records(tasks=2, trials=1)
    del recs[0]["seed"]
    with pytest.raises(ResultsError, match="r.jsonl:1: missing field\\(s\\) seed"):
        read_results(write_jsonl(tmp_path / "r.jsonl", recs))


def test_aliases_extra_and_directory(tmp_path):
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
    assert out[0].extra == {"video": "x.mp4"} and out[0]["video"] == "x.mp4" and out[0]["error"] is None
    assert EpisodeResult.from_dict(out[0].to_dict()) == out[0]
    assert dict(out[0])["task_id"] == 2 and "task" not in out[0]


def test_missing_file_and_empty_dir(tmp_path):
    with pytest.raises(ResultsError, match="not found"):
        read_results(tmp_path / "nope.jsonl")
    with pytest.raises(ResultsError, match="no \\*.jsonl"):
        read_results(tmp_path)


def test_outcomes_dedupes_repeats_and_rejects_conflicts():
    a = EpisodeResult("s", 0, 0, 7, True)
    b = EpisodeResult("s", 0, 1, 7, False)
    assert outcomes([a, b, a]) == {("s", 0, 0, 7): True, ("s", 0, 1, 7): False}
    with pytest.raises(ResultsError, match="different outcomes"):
        outcomes([a, EpisodeResult("s", 0, 0, 7, False)])
