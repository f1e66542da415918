"""The gate's verdicts on the reference policy's committed GPU runs (docs/results/reference/, 500 paired episodes).

These are real rollouts (H200, 2026-11-30, docs/reference-quantization.md) judged against the committed FP
golden by the same call `duquant gate` makes. 500 paired episodes can show a drop below a preset's 2-5 point
allowance, which CI's 20 CPU episodes (suites/libero/test_reference_gate.py) never can: here the healthy W4A8
preset's PASS is checked, and the presets that lose success are called regressions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_duquant.commands.gate import main as gate_main
from pytest_duquant.judge import PASS, REGRESSION, judge
from pytest_duquant.results import read_results

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "docs" / "results" / "reference"
GOLDEN = ROOT / "golden"


def _judged(setting: str, **kw):
    records = read_results(RUNS / f"libero_object_{setting}.jsonl")
    j = judge(records, GOLDEN, **kw)
    (suite,) = j.suites
    return records, j, suite


@pytest.mark.parametrize("setting,successes,allowed", [("A", 459, 0.03), ("precision", 462, 0.02)])
def test_the_healthy_presets_pass_on_500_paired_gpu_episodes(setting, successes, allowed):
    records, j, suite = _judged(setting)
    assert len(records) == 500 and sum(r.success for r in records) == successes
    assert suite.outcome == PASS, suite.reason
    assert j.exit_code == 0
    lo, hi = suite.decision.ci
    assert suite.decision.n == 500
    assert hi < suite.decision.allowed_drop == pytest.approx(allowed)  # shown below the preset's allowance
    assert lo < 0 < hi  # and the FP-vs-preset difference itself is not shown either way


@pytest.mark.parametrize("setting,successes", [("B", 396), ("speed", 390), ("w3", 197), ("w2", 1)])
def test_the_presets_that_lose_success_are_regressions(setting, successes):
    records, j, suite = _judged(setting)
    assert len(records) == 500 and sum(r.success for r in records) == successes
    assert suite.outcome == REGRESSION, suite.reason
    assert j.exit_code == 1
    assert suite.decision.ci[0] > suite.decision.allowed_drop


def test_duquant_gate_exit_codes_on_the_committed_runs(capsys):
    assert gate_main([str(RUNS / "libero_object_A.jsonl"), str(GOLDEN)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert gate_main([str(RUNS / "libero_object_B.jsonl"), str(GOLDEN)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
