"""`duquant golden make RESULTS.jsonl`: FP results -> goldens; refuses quantized, killed or clashing input."""

from __future__ import annotations

from pytest_duquant.cli import main
from pytest_duquant.golden.episodes import path_for, read_golden
from pytest_duquant.testing import FINGERPRINT, make_records, write_jsonl


def test_make_then_unchanged_then_refused_then_forced(tmp_path, capsys):
    fp = write_jsonl(tmp_path / "fp.jsonl", make_records(tasks=4, trials=5, rng_seed=1))
    root = tmp_path / "golden"
    assert main(["golden", "make", str(fp), "--root", str(root), "--allowed-drop", "B=0.2"]) == 0
    path = path_for(root, FINGERPRINT, "libero_spatial")
    assert "created" in capsys.readouterr().out and read_golden(path).allowed_drop["B"] == 0.2
    assert main(["golden", "make", str(fp), "--root", str(root), "--allowed-drop", "B=0.2"]) == 0
    assert "unchanged" in capsys.readouterr().out
    other = write_jsonl(tmp_path / "fp2.jsonl", make_records(tasks=4, trials=5, rng_seed=2))
    before = path.read_text()
    assert main(["golden", "make", str(other), "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "a different golden exists; replace it with --force" in err and "outcome(s) changed" in err
    assert path.read_text() == before
    assert main(["golden", "make", str(other), "--root", str(root), "--force"]) == 0
    out = capsys.readouterr().out
    assert "replaced (previous kept as" in out and "allowed_drop" in out
    assert [p.name for p in path.parent.glob("*.bak")]


def test_refuses_quantized_killed_and_truncated_runs(tmp_path, capsys):
    root = str(tmp_path / "golden")
    q = write_jsonl(tmp_path / "q.jsonl", make_records(tasks=2, trials=2, preset="B"))
    assert main(["golden", "make", str(q), "--root", root]) == 2
    assert "made from an FP (unquantized) run" in capsys.readouterr().err
    killed = write_jsonl(tmp_path / "k.jsonl", make_records(tasks=10, trials=5)[:-3])
    assert main(["golden", "make", str(killed), "--root", root]) == 2
    assert "incomplete FP run: 3 of the 10 tasks x 5 trials" in capsys.readouterr().err
    short = write_jsonl(tmp_path / "s.jsonl", make_records(tasks=10, trials=2))
    assert main(["golden", "make", str(short), "--root", root, "--trials", "50"]) == 2
    assert "480 of the 10 tasks x 50 trials" in capsys.readouterr().err
    cut = write_jsonl(tmp_path / "t.jsonl", make_records(tasks=2, trials=2), tail='{"suite": "libero_sp')
    assert main(["golden", "make", str(cut), "--root", root]) == 2
    assert "truncated last line" in capsys.readouterr().err
    assert not (tmp_path / "golden").exists()
