"""The 2026-11-30 statistical audit of the gate, item by item: each test fails on the old behaviour."""

from __future__ import annotations

import json
import math
import time

import numpy as np

from pytest_duquant import gate as g
from pytest_duquant.cli import main
from pytest_duquant.judge import judge, sequential_design
from pytest_duquant.results import EpisodeResult, read_results
from pytest_duquant.testing import make_records, write_jsonl


def test_1_a_killed_run_is_never_judged(setup, capsys):
    """Old: a run 20 points worse, killed halfway with its finished episodes mostly successes, exited 0."""
    worse = dict(setup.ref)
    for k in [k for k, v in setup.ref.items() if v and k.trial >= 5][:20]:
        worse[k] = False  # 20 points worse, all in the second half (trial-major order)
    recs = make_records(tasks=10, trials=10, preset="B", outcomes=worse)
    cand = write_jsonl(setup.tmp / "killed.jsonl", recs[:50])  # killed halfway
    assert sum(not r.success for r in read_results(cand)) == sum(not setup.ref[k] for k in setup.ref if k.trial < 5)
    assert main(["gate", str(cand), str(setup.path)]) == 2
    out = capsys.readouterr().out
    assert "incomplete run: 50 of the 100 planned episodes are missing" in out
    assert "libero_spatial/task0/trial5/seed7" in out  # names what is missing


def test_2_an_unwritable_json_path_is_unusable_input_before_any_verdict(setup, capsys):
    """Old: printed 'VERDICT: PASS (exit 0)' and then exited 1 (the code of a regression)."""
    blocker = setup.tmp / "file"
    blocker.write_text("")
    assert main(["gate", str(setup.candidate()), str(setup.path), "--json", str(blocker / "v.json")]) == 2
    captured = capsys.readouterr()
    assert "VERDICT" not in captured.out and "cannot write there" in captured.err


def test_3_a_pass_needs_the_data_to_show_the_drop_is_small():
    """Old: PASS = 'not shown worse'; at n = 100 a true 10-point drop (twice the allowance) passed 45-87 %
    of the time. Now P(PASS) at a true drop of 2 delta is at most alpha, exactly."""
    n, delta = 100, 0.05
    table = g.verdict_table(n, delta, 0.05)
    for p_c in (0.0, 0.01, 0.05):
        probs = g._trinomial_grid(n, p_c + 2 * delta, p_c)
        p_pass = float(probs[table == 0].sum())
        assert p_pass <= 0.05, (p_c, p_pass)
        old_pass = 1 - g.paired_power(n, delta, 0.05, 2 * delta, p_c)  # not rejected = old PASS
        assert old_pass > 0.4
    keys = [("s", 0, i, 7) for i in range(n)]
    ref = {k: i >= 1 for i, k in enumerate(keys)}
    cand = {k: (i == 0) or (i >= 7 and ref[k]) for i, k in enumerate(keys)}  # b = 6, c = 1: 5 points
    assert g.paired_pvalue(6, 1, n, delta) > 0.05  # the old gate's PASS
    assert g.gate(ref, cand, allowed_drop=delta).verdict == g.INCONCLUSIVE


def test_4_every_suite_in_the_results_is_judged_or_reported(setup, capsys):
    """Old: results of two suites against one golden file judged one suite and exited 0."""
    other = make_records(suite="libero_goal", tasks=10, trials=10, preset="B", rate=0.5)
    cand = setup.candidate(extra=other)
    assert main(["gate", str(cand), str(setup.path)]) == 2
    out = capsys.readouterr().out
    assert "libero_goal: UNUSABLE: not judgeable: the golden given" in out and "libero_spatial: PASS" in out


def test_5_sequential_design_is_computed_once_and_a_call_at_2000_is_fast(tmp_path):
    """Old: the design was recomputed on every call (147 s / 2.8 GB at N = 2000)."""
    kw = dict(looks=4, alpha=0.05, allowed_drop=0.05, min_first=20, cache=tmp_path)
    t0 = time.perf_counter()
    d = sequential_design(2000, **kw)
    first = time.perf_counter() - t0
    g._design.cache_clear()  # a new process: only the disk cache is left
    t0 = time.perf_counter()
    assert sequential_design(2000, **kw) == d
    assert time.perf_counter() - t0 < 1.0, first
    keys = [("s", i % 40, i // 40, 7) for i in range(2000)]
    ref = dict.fromkeys(keys, True)
    t0 = time.perf_counter()
    got = g.sequential_monitor(ref, {k: True for k in g.schedule_order(keys)[:1000]}, design=d)
    assert time.perf_counter() - t0 < 1.0 and got.verdict in (g.PASS, g.CONTINUE)


def test_5_sequential_missing_episode_or_other_seed_is_unusable_not_continue(setup, capsys):
    full = [r for r in make_records(tasks=10, trials=10, preset="B", outcomes=setup.ref)]
    order = {tuple(k): i for i, k in enumerate(g.schedule_order(list(setup.ref)))}
    full.sort(key=lambda r: order[(r["suite"], r["task_id"], r["trial"], r["seed"])])
    skipped = write_jsonl(setup.tmp / "skip.jsonl", full[:3] + full[4:])  # episode 4 never ran
    seq = ["--mode", "sequential"]
    assert main(["gate", str(skipped), str(setup.path), *seq]) == 2
    assert "is missing while 96 episodes after it are done" in capsys.readouterr().out
    in_flight = write_jsonl(setup.tmp / "flight.jsonl", full[:3] + full[4:10])  # 6 later ones: still running
    assert main(["gate", str(in_flight), str(setup.path), *seq]) == 3
    other_seed = setup.candidate("seed.jsonl", seed=8)
    assert main(["gate", str(other_seed), str(setup.path), *seq]) == 2


def test_5_sequential_honours_min_episodes_and_max_mdd(setup):
    recs = [EpisodeResult.from_dict(r) for r in make_records(tasks=10, trials=10, preset="B", outcomes=setup.ref)]
    j = judge(recs, setup.path, mode="sequential", min_episodes=60, design_cache=False, allowed_drop=0.15)
    d = j.suites[0].decision
    assert d.sequential["looks"][0] >= 60 and j.exit_code == 0
    j = judge(recs, setup.path, mode="sequential", design_cache=False, allowed_drop=0.15, max_mdd=0.01)
    assert j.exit_code == 3  # no look can detect a 1-point drop: never a pass


def test_6_the_verdict_is_monotone_in_delta_and_agrees_with_the_printed_interval(tmp_path):
    """Old: REGRESSION at delta = 0.05 and PASS at 0.0475 on the same data (b = 12, c = 1 of 100)."""
    from tests.judge.conftest import Setup

    s = Setup(tmp_path, rng_seed=5)
    assert sum(not v for v in s.ref.values()) >= 1
    cand = s.candidate(flip=12, gain=1)
    codes = []
    for delta in sorted({*np.arange(0.0, 0.30, 0.02).round(4), 0.0475, 0.05}):
        j = judge(read_results(cand), s.path, allowed_drop=float(delta))
        d = j.suites[0].decision
        assert (d.b, d.c) == (12, 1)
        assert (j.verdict == g.REGRESSION) == (d.ci[0] > delta) and (j.verdict == g.PASS) == (d.ci[1] < delta)
        codes.append({g.REGRESSION: 0, g.INCONCLUSIVE: 1, g.PASS: 2}[j.verdict])
    assert codes == sorted(codes) and codes[0] == 0 and codes[-1] == 2


def test_7_a_golden_of_another_stack_or_device_is_flagged(tmp_path, capsys):
    """Old: the golden's recorded versions were never compared."""
    from pytest_duquant.golden.episodes import golden_from_results, path_for, write

    env_golden = {"versions": {"torch": "2.4.0", "mujoco": "3.1.0"}, "device": "cuda:0 (NVIDIA H100)"}
    env_run = {"versions": {"torch": "2.13.0", "mujoco": "3.1.0"}, "device": "cpu"}
    fp = [{**r, "env": env_golden} for r in make_records(rate=0.95)]
    g_ = golden_from_results([EpisodeResult.from_dict(r) for r in fp])
    write(path_for(tmp_path, g_.fingerprint, g_.suite), g_)
    cand = write_jsonl(tmp_path / "c.jsonl", [{**r, "preset": "B", "env": env_run} for r in fp])
    out_json = tmp_path / "v.json"
    assert main(["gate", str(cand), str(tmp_path), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "drift: the golden's FP run used another stack/device" in text and "torch: golden 2.4.0, run 2.13.0" in text
    assert json.loads(out_json.read_text())["suites"][0]["drift"] == [
        "device: golden cuda:0 (NVIDIA H100), run cpu", "torch: golden 2.4.0, run 2.13.0"
    ]


def test_7_same_machine_mode_pairs_with_the_fp_arm_and_checks_its_drift(setup, capsys):
    """FP and candidate rolled out in the same job: the candidate is paired with that FP arm; the golden only
    says whether the FP arm drifted (here the FP arm lost 15 points on this 'machine')."""
    fp_arm = write_jsonl(setup.tmp / "fp_arm.jsonl",
                         make_records(tasks=10, trials=10, preset="fp", outcomes=setup.outcomes(flip=15)))
    cand = write_jsonl(setup.tmp / "cand.jsonl",
                       make_records(tasks=10, trials=10, preset="B", outcomes=setup.outcomes(flip=15)))
    assert main(["gate", str(cand), str(setup.path)]) == 1  # against the golden: the shift looks like a drop
    assert main(["gate", str(cand), str(setup.path), "--fp-results", str(fp_arm)]) == 0
    out = capsys.readouterr().out
    assert "same-machine mode" in out and "the FP arm is shown WORSE than the golden" in out


def test_smoke_plan_of_20_episodes_passes_and_a_sabotaged_quantizer_regresses(tmp_path, capsys):
    """The CI design: a 500-episode golden, a 20-episode run (tasks 0-9 x trials 0-1) under delta = 0.2."""
    from tests.judge.conftest import Setup

    s = Setup(tmp_path, tasks=10, trials=50, rate=0.97, rng_seed=1)
    plan = ["--tasks", "0-9", "--trials", "2", "--allowed-drop", "0.2"]
    first20 = lambda recs: [r for r in recs if r["trial"] < 2]  # noqa: E731
    good = s.candidate("good.jsonl", keep=first20)
    assert main(["gate", str(good), str(s.path), *plan]) == 0
    assert "upper bound 13.9" in capsys.readouterr().out  # 1 - 0.05 ** (1 / 20) = 0.139 < 0.2
    sabotaged = s.candidate("bad.jsonl", keep=lambda recs: [{**r, "success": False} for r in first20(recs)])
    assert main(["gate", str(sabotaged), str(s.path), *plan]) == 1
    killed = s.candidate("killed.jsonl", keep=lambda recs: first20(recs)[:15])
    assert main(["gate", str(killed), str(s.path), *plan]) == 2
    assert main(["gate", str(good), str(s.path), "--tasks", "0-9", "--trials", "2"]) == 3  # delta 0.05: too few


def test_the_smallest_regression_a_20_episode_plan_detects():
    """docs/gate.md quotes it: with delta = 0.2 and 20 pairs, b - c must reach this to be a regression."""
    table = g.verdict_table(20, 0.2, 0.05)
    assert min(b for b in range(21) if table[b, 0] == 1) == 9
    assert math.isclose(1 - 0.05 ** (1 / 20), 0.1391, abs_tol=1e-4)
    assert table[0, 0] == 0 and table[1, 0] == -1
