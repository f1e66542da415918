"""`duquant gate` through the console entry (pytest_duquant.cli.main): every exit code, output, options."""

from __future__ import annotations

import json

import pytest

from pytest_duquant.cli import main
from pytest_duquant.testing import make_records, write_jsonl


def test_exit_0_pass_prints_a_table_and_writes_json(setup, capsys):
    out_json = setup.tmp / "verdict.json"
    assert main(["gate", str(setup.candidate()), str(setup.path), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "VERDICT: PASS (exit 0)" in text and "libero_spatial" in text and "interval of drop" in text
    rep = json.loads(out_json.read_text())
    assert rep["verdict"] == "pass" and rep["exit_code"] == 0 and rep["preset"] == "B"
    d = rep["suites"][0]["decision"]
    assert d["mode"] == "paired" and d["n"] == 100 and d["b"] == 0 and d["c"] == 0 and d["ci"][1] < 0.05


def test_exit_1_regression(setup, capsys):
    assert main(["gate", str(setup.candidate(flip=20)), str(setup.root)]) == 1
    text = capsys.readouterr().out
    assert "VERDICT: REGRESSION (exit 1)" in text and "REGRESSION: the drop is shown above" in text


def test_exit_2_unusable_inputs(setup, capsys):
    tmp = setup.tmp
    assert main(["gate", str(tmp / "missing.jsonl"), str(setup.path)]) == 2
    bad = tmp / "bad.jsonl"
    bad.write_text('{"suite": "libero_spatial"}\n{broken\n')
    assert main(["gate", str(bad), str(setup.path)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["gate", str(setup.candidate()), str(tmp / "nogolden")]) == 2
    (tmp / "corrupt.json").write_text("[]")
    assert main(["gate", str(setup.candidate()), str(tmp / "corrupt.json")]) == 2
    assert main(["gate", str(setup.candidate()), str(setup.path), "--preset", "turbo"]) == 2
    assert "no allowed drop for preset 'turbo'" in capsys.readouterr().out
    out = tmp / "u.json"
    assert main(["gate", str(bad), str(setup.path), "--json", str(out)]) == 2
    assert json.loads(out.read_text())["verdict"] == "unusable"


@pytest.mark.parametrize(
    "kw,needle",
    [({"fingerprint": "sha256-other"}, "fingerprint"), ({"protocol": "lerobot-libero-v1"}, "protocol"),
     ({"seed": 8}, "seed")],
)
def test_exit_2_for_another_checkpoint_protocol_or_seed(setup, capsys, kw, needle):
    assert main(["gate", str(setup.candidate(**kw)), str(setup.path)]) == 2
    assert needle in capsys.readouterr().out
    assert main(["gate", str(setup.candidate(**kw)), str(setup.root)]) == 2


def test_exit_2_too_few_planned_episodes(setup, capsys):
    assert main(["gate", str(setup.candidate()), str(setup.path), "--tasks", "0-4", "--trials", "2"]) == 2
    assert "only 10 episodes are planned, fewer than --min-episodes 20" in capsys.readouterr().out
    assert main(["gate", str(setup.candidate()), str(setup.path), "--tasks", "0-4", "--trials", "2",
                 "--min-episodes", "10", "--allowed-drop", "0.3"]) == 0


def test_exit_3_inconclusive_says_how_many_more_episodes(setup, capsys):
    assert main(["gate", str(setup.candidate(flip=4)), str(setup.path)]) == 3
    text = capsys.readouterr().out
    assert "VERDICT: INCONCLUSIVE (exit 3)" in text and "more paired episodes would likely decide it" in text


def test_exit_4_internal_error(setup, capsys, monkeypatch):
    import pytest_duquant.judge

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(pytest_duquant.judge, "judge", broken)
    assert main(["gate", str(setup.candidate()), str(setup.path)]) == 4
    err = capsys.readouterr().err
    assert "internal error (RuntimeError: boom)" in err and "Traceback" in err


def test_allowed_drop_overrides_the_goldens_table(setup):
    cand = setup.candidate(flip=20)
    assert main(["gate", str(cand), str(setup.path), "--allowed-drop", "0.4"]) == 0
    assert main(["gate", str(cand), str(setup.path), "--allowed-drop", "0.05"]) == 1


def test_a_missing_preset_needs_the_flag(setup):
    p = setup.candidate(preset=None)
    assert main(["gate", str(p), str(setup.path)]) == 2
    assert main(["gate", str(p), str(setup.path), "--preset", "B"]) == 0


def test_max_mdd_makes_an_underpowered_pass_inconclusive(setup):
    assert main(["gate", str(setup.candidate()), str(setup.path), "--max-mdd", "0.01"]) == 3
    assert main(["gate", str(setup.candidate()), str(setup.path), "--max-mdd", "0.5"]) == 0


def test_two_suites_from_a_golden_root_bonferroni(tmp_path, capsys):
    from pytest_duquant.golden.episodes import golden_from_results, path_for, write
    from pytest_duquant.results import EpisodeResult

    root, cands = tmp_path / "golden", []
    for suite in ("libero_spatial", "libero_goal"):
        g = golden_from_results([EpisodeResult.from_dict(r) for r in make_records(suite=suite, rate=0.95,
                                                                                  rng_seed=len(suite))])
        write(path_for(root, g.fingerprint, suite), g)
        out = g.outcomes()
        if suite == "libero_goal":
            for k in [k for k, v in out.items() if v][:25]:
                out[k] = False
        cands += make_records(suite=suite, preset="B", outcomes=out)
    res = write_jsonl(tmp_path / "r.jsonl", cands)
    js = tmp_path / "v.json"
    assert main(["gate", str(res), str(root), "--json", str(js), "--allowed-drop", "0.1"]) == 1
    rep = json.loads(js.read_text())
    assert {s["suite"]: s["verdict"] for s in rep["suites"]} == {"libero_goal": "regression", "libero_spatial": "pass"}
    assert all(s["decision"]["alpha"] == pytest.approx(0.025) for s in rep["suites"])  # regression side alpha/2
    assert all(s["decision"]["pass_alpha"] == pytest.approx(0.05) for s in rep["suites"])
    assert "2 suites (regression side at alpha/2, bonferroni)" in capsys.readouterr().out


def test_sequential_mode_continue_then_decide(setup):
    full = setup.candidate(flip=40)
    lines = full.read_text().splitlines(keepends=True)
    part = setup.tmp / "part.jsonl"
    part.write_text("".join(lines[:15]))  # the first look needs 25 scheduled episodes
    seq = ["--mode", "sequential", "--min-episodes", "20"]
    assert main(["gate", str(part), str(setup.path), *seq]) == 3
    assert main(["gate", str(full), str(setup.path), *seq]) == 1
    assert main(["gate", str(setup.candidate(), ), str(setup.path), *seq, "--allowed-drop", "0.15"]) == 0


def test_module_main_is_the_same_command(setup):
    from pytest_duquant.commands import gate as cmd

    assert cmd.main([str(setup.candidate(flip=30)), str(setup.path)]) == 1
