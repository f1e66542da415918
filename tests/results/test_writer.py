"""The results JSONL: append + fsync, partial-line repair, no duplicates, one run per file."""

from __future__ import annotations

import json

import pytest

from pytest_duquant.results import (
    EpisodeKey,
    ResultsError,
    ResultsTruncatedWarning,
    ResultsWriter,
    read_results,
    summarize,
)

RUN = {"protocol": "openpi-libero-v1", "fingerprint": "abc", "preset": "B"}


def rec(task, trial, success=True, **kw):
    r = {
        "suite": "libero_spatial",
        "task_id": task,
        "trial": trial,
        "seed": 7,
        "success": success,
        "steps": 50,
        "wall_s": 1.0,
        "error": None,
        **RUN,
    }
    r.update(kw)
    return r


def test_append_writes_one_line_per_episode_at_once(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultsWriter(p, RUN) as w:
        w.append(rec(0, 0))
        assert len(p.read_text().splitlines()) == 1  # on disk before the writer is closed
        w.append(rec(0, 1, success=False))
    lines = p.read_text().splitlines()
    assert [json.loads(x)["trial"] for x in lines] == [0, 1]
    assert [r["success"] for r in read_results(p)] == [True, False]


def test_a_partial_last_line_is_cut_and_the_episode_rerun(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultsWriter(p, RUN) as w:
        w.append(rec(0, 0))
        w.append(rec(0, 1))
    good = p.read_bytes()
    p.write_bytes(good + b'{"suite": "libero_spatial", "task_id": 0, "tri')  # killed mid-write
    with pytest.warns(ResultsTruncatedWarning):
        assert len(read_results(p)) == 2
    with ResultsWriter(p, RUN) as w:
        assert set(w.done) == {EpisodeKey("libero_spatial", 0, 0, 7), EpisodeKey("libero_spatial", 0, 1, 7)}
        w.append(rec(0, 2))
    data = p.read_bytes()
    assert data.startswith(good) and data.count(b"\n") == 3
    assert [r["trial"] for r in read_results(p)] == [0, 1, 2]


def test_a_complete_last_record_without_newline_is_kept(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(rec(1, 0)))
    with ResultsWriter(p, RUN) as w:
        assert EpisodeKey("libero_spatial", 1, 0, 7) in w.done
        w.append(rec(1, 1))
    assert [r["trial"] for r in read_results(p)] == [0, 1]


def test_an_episode_is_never_written_twice(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultsWriter(p, RUN) as w:
        w.append(rec(0, 0))
        with pytest.raises(ResultsError, match="already recorded"):
            w.append(rec(0, 0, success=False))
    with ResultsWriter(p, RUN) as w, pytest.raises(ResultsError, match="already recorded"):
        w.append(rec(0, 0))
    assert len(read_results(p)) == 1


def test_a_file_of_another_run_is_refused(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultsWriter(p, RUN) as w:
        w.append(rec(0, 0))
    with pytest.raises(ResultsError, match="another run.*'preset': 'B'.*'preset': 'A'"):
        ResultsWriter(p, {**RUN, "preset": "A"})


def test_a_corrupt_middle_line_is_an_error_naming_the_line(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(rec(0, 0)) + "\nnot json\n" + json.dumps(rec(0, 1)) + "\n")
    with pytest.raises(ResultsError, match=r"r.jsonl:2: not valid JSON"):
        read_results(p)
    with pytest.raises(ResultsError, match=r"r.jsonl:2: not valid JSON"):
        ResultsWriter(p, RUN)  # never "repaired" by cutting a finished episode
    p.write_text(json.dumps({"suite": "libero_spatial"}) + "\n")
    with pytest.raises(ResultsError, match="missing field\\(s\\) task_id"):
        read_results(p)


def test_the_writer_validates_and_the_reader_reads_what_it_wrote(tmp_path):
    p = tmp_path / "r.jsonl"
    with ResultsWriter(p, RUN) as w:
        got = w.append(rec(0, 0, success=True, instruction="pick up the bowl", queries=3, sim_s=1.0))
        w.append(rec(2, 1, success=False, error="RuntimeError: boom"))
        with pytest.raises(ResultsError, match="missing field\\(s\\) error"):
            w.append({k: v for k, v in rec(3, 0).items() if k != "error"})
        with pytest.raises(ResultsError, match="success='no'"):
            w.append(rec(3, 1, success="no"))
    assert got.key == EpisodeKey("libero_spatial", 0, 0, 7) and got["queries"] == 3
    back = read_results(p)
    assert [(r.task_id, r.trial, r.success, r.fingerprint, r.preset, r.protocol) for r in back] == [
        (0, 0, True, "abc", "B", "openpi-libero-v1"),
        (2, 1, False, "abc", "B", "openpi-libero-v1"),
    ]
    assert back[0]["instruction"] == "pick up the bowl" and back[1].error == "RuntimeError: boom"


def test_summarize():
    s = summarize([rec(0, 0), rec(0, 1, success=False, error="x"), rec(1, 0)])
    assert s["libero_spatial"] == {"episodes": 3, "successes": 2, "errors": 1, "success_rate": 2 / 3}
