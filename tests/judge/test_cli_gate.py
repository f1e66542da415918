"""Exit codes and output of `duquant gate` (through pytest_duquant.cli.main, as the console script)."""

from __future__ import annotations

import json

import pytest
from pytest_duquant.golden_libero import golden_from_results, golden_path, write_golden
from pytest_duquant.results_io import EpisodeResult

from pytest_duquant.cli import main


@pytest.fixture
def setup(tmp_path, builders):
    """A golden root with one suite (100 FP episodes) and a writer of candidate results."""
    fp_recs = builders.make_records(tasks=10, trials=10, rate=0.95, rng_seed=3)
    g = golden_from_results([EpisodeResult.from_dict(r) for r in fp_recs])
    root = tmp_path / "golden"
    gpath = write_golden(golden_path(root, g.fingerprint, g.suite), g).path
    ref = g.outcomes()

    def candidate(name="cand.jsonl", flip=0, **kw):
        out = dict(ref)
        for k in [k for k, v in ref.items() if v][:flip]:
            out[k] = False
        recs = builders.make_records(tasks=10, trials=10, preset=kw.pop("preset", "B"), outcomes=out, **kw)
        return builders.write_jsonl(tmp_path / name, recs)

    return root, gpath, candidate, tmp_path


def test_pass_exits_0_and_prints_a_table(setup, capsys):
    root, gpath, candidate, tmp = setup
    out_json = tmp / "verdict.json"
    assert main(["gate", str(candidate()), str(gpath), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "VERDICT: PASS" in text and "libero_spatial" in text and "MDD80" in text
    rep = json.loads(out_json.read_text())
    assert rep["verdict"] == "pass" and rep["exit_code"] == 0 and rep["preset"] == "B"
    d = rep["suites"][0]["decision"]
    assert d["mode"] == "paired" and d["n"] == 100 and d["b"] == 0 and d["c"] == 0
    assert d["allowed_drop"] == 0.05


def test_regression_exits_1(setup, capsys):
    root, gpath, candidate, tmp = setup
    assert main(["gate", str(candidate(flip=20)), str(root)]) == 1
    text = capsys.readouterr().out
    assert "VERDICT: REGRESSION" in text and "REGRESSION: the drop exceeds" in text


def test_small_drop_within_allowance_passes_but_larger_allowance_flag_changes_it(setup):
    root, gpath, candidate, tmp = setup
    cand = candidate(flip=20)
    assert main(["gate", str(cand), str(gpath), "--allowed-drop", "0.3"]) == 0
    assert main(["gate", str(cand), str(gpath), "--allowed-drop", "0.05"]) == 1


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"fingerprint": "sha256-other"}, "fingerprint"),
        ({"protocol": "lerobot-libero-v1"}, "protocol"),
    ],
)
def test_mismatch_exits_2(setup, capsys, kw, needle):
    root, gpath, candidate, tmp = setup
    assert main(["gate", str(candidate(**kw)), str(gpath)]) == 2
    assert needle in capsys.readouterr().err
    assert main(["gate", str(candidate(**kw)), str(root)]) == 2


def test_unusable_inputs_exit_2(setup, builders, capsys):
    root, gpath, candidate, tmp = setup
    assert main(["gate", str(tmp / "missing.jsonl"), str(gpath)]) == 2
    bad = tmp / "bad.jsonl"
    bad.write_text('{"suite": "libero_spatial"}\n{broken\n')
    assert main(["gate", str(bad), str(gpath)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["gate", str(candidate()), str(tmp / "nogolden")]) == 2
    (tmp / "corrupt.json").write_text("[]")
    assert main(["gate", str(candidate()), str(tmp / "corrupt.json")]) == 2
    assert main(["gate", str(candidate()), str(gpath), "--preset", "turbo"]) == 2
    assert "no allowed drop for preset 'turbo'" in capsys.readouterr().err
    few = builders.write_jsonl(
        tmp / "few.jsonl", builders.make_records(tasks=2, trials=2, preset="B", seed=99)
    )
    assert main(["gate", str(few), str(gpath)]) == 2  # no shared episodes and only 4 episodes
    assert "too few" in capsys.readouterr().err
    out = tmp / "u.json"
    assert main(["gate", str(few), str(gpath), "--json", str(out)]) == 2
    assert json.loads(out.read_text())["verdict"] == "unusable"


def test_missing_preset_needs_the_flag(setup, builders):
    root, gpath, candidate, tmp = setup
    p = candidate(preset=None)
    assert main(["gate", str(p), str(gpath)]) == 2
    assert main(["gate", str(p), str(gpath), "--preset", "B"]) == 0


def test_max_mdd_makes_an_underpowered_pass_inconclusive(setup):
    root, gpath, candidate, tmp = setup
    assert main(["gate", str(candidate()), str(gpath), "--max-mdd", "0.01"]) == 2
    assert main(["gate", str(candidate()), str(gpath), "--max-mdd", "0.5"]) == 0


def test_two_suites_from_a_golden_root_with_holm(tmp_path, builders, capsys):
    root = tmp_path / "golden"
    cands = []
    for suite in ("libero_spatial", "libero_goal"):
        recs = builders.make_records(suite=suite, tasks=10, trials=10, rate=0.95, rng_seed=len(suite))
        g = golden_from_results([EpisodeResult.from_dict(r) for r in recs])
        write_golden(golden_path(root, g.fingerprint, suite), g)
        out = g.outcomes()
        if suite == "libero_goal":
            for k in [k for k, v in out.items() if v][:25]:
                out[k] = False
        cands += builders.make_records(suite=suite, tasks=10, trials=10, preset="B", outcomes=out)
    res = builders.write_jsonl(tmp_path / "r.jsonl", cands)
    js = tmp_path / "v.json"
    assert main(["gate", str(res), str(root), "--json", str(js)]) == 1
    rep = json.loads(js.read_text())
    verdicts = {s["suite"]: s["verdict"] for s in rep["suites"]}
    assert verdicts == {"libero_goal": "regression", "libero_spatial": "pass"}
    assert all(s["p_adjusted"] >= s["decision"]["p_value"] for s in rep["suites"])
    assert "holm" in capsys.readouterr().out


def test_sequential_mode_continue_then_decide(setup, builders):
    root, gpath, candidate, tmp = setup
    full = candidate(flip=40)
    lines = full.read_text().splitlines(keepends=True)
    part = tmp / "part.jsonl"
    part.write_text("".join(lines[:15]))  # first look needs 25 scheduled episodes
    assert main(["gate", str(part), str(gpath), "--mode", "sequential"]) == 3
    assert main(["gate", str(full), str(gpath), "--mode", "sequential"]) == 1
    assert main(["gate", str(candidate()), str(gpath), "--mode", "sequential"]) == 0


def test_module_main_is_the_same_command(setup):
    from pytest_duquant.commands import gate as cmd

    root, gpath, candidate, tmp = setup
    assert cmd.main([str(candidate(flip=30)), str(gpath)]) == 1
