"""gate() / sequential_monitor(): three-way verdicts, modes, reported numbers, input errors."""

from __future__ import annotations

import math

import pytest

from pytest_duquant import gate as g


def _runs(n=200, ref_fail=10, b=0, c=0, suite="libero_spatial"):
    """Reference with `ref_fail` failures; candidate loses b ref successes, gains c ref failures."""
    keys = [(suite, i % 10, i // 10, 7) for i in range(n)]
    ref = {k: i >= ref_fail for i, k in enumerate(keys)}
    cand = dict(ref)
    for k in keys[ref_fail : ref_fail + b]:
        cand[k] = False
    for k in keys[:c]:
        cand[k] = True
    return ref, cand


def test_paired_regression_numbers():
    ref, cand = _runs(n=200, ref_fail=10, b=30, c=2)
    d = g.gate(ref, cand, allowed_drop=0.05, alpha=0.05)
    assert d.verdict == g.REGRESSION and d.mode == "paired"
    assert (d.n, d.b, d.c) == (200, 30, 2)
    assert d.reference_rate == pytest.approx(190 / 200) and d.candidate_rate == pytest.approx(162 / 200)
    assert d.drop == pytest.approx(28 / 200)
    assert d.p_value >= g.paired_pvalue(30, 2, 200, 0.05) and d.p_value < 0.05  # the monotone p
    assert d.ci[0] > 0.05 and d.ci[0] < d.drop < d.ci[1] and d.ci_level == pytest.approx(0.9)
    assert 0.05 < d.mdd < 0.2 and d.extra_pairs is None
    assert "REGRESSION" in d.explanation and "30 reference-only" in d.explanation
    assert d.to_dict()["threshold"] == pytest.approx(0.95 - 0.05)


def test_identical_runs_pass_only_with_enough_pairs():
    small = g.gate(*_runs(n=40), allowed_drop=0.05)
    big = g.gate(*_runs(n=400), allowed_drop=0.05)
    assert small.verdict == g.INCONCLUSIVE and small.ci[1] >= 0.05 and small.extra_pairs > 0
    assert "more paired episodes would likely decide" in small.explanation
    assert big.verdict == g.PASS and big.ci[1] < 0.05 and big.p_pass <= 0.05
    assert big.mdd < small.mdd or small.mdd is None


def test_a_drop_near_the_allowance_is_inconclusive_not_a_pass():
    # observed drop 4% with delta 5%: no longer "not shown worse = pass"; delta 0: regression
    ref, cand = _runs(n=400, ref_fail=20, b=16, c=0)
    d = g.gate(ref, cand, allowed_drop=0.05)
    assert d.verdict == g.INCONCLUSIVE and d.ci[0] < 0.05 < d.ci[1]
    assert g.gate(ref, cand, allowed_drop=0.0).verdict == g.REGRESSION
    assert g.gate(ref, cand, allowed_drop=0.2).verdict == g.PASS


def test_unpaired_mode_on_independent_samples():
    ref, _ = _runs(n=200, ref_fail=10)
    cand = {("libero_spatial", i % 10, i // 10, 8): i >= 60 for i in range(200)}  # other seed
    d = g.gate(ref, cand, allowed_drop=0.05, mode="unpaired")
    assert d.mode == "unpaired" and d.verdict == g.REGRESSION and d.b is None
    assert (d.n_reference, d.n_candidate, d.reference_successes, d.candidate_successes) == (200, 200, 190, 140)
    with pytest.raises(g.GateInputError, match="same episodes"):
        g.gate(ref, cand, allowed_drop=0.05, mode="paired")


def test_paired_mode_refuses_runs_of_different_episodes():
    """Audit 1 at the library level: an episode missing from the candidate is never silently dropped."""
    ref, cand = _runs(n=200)
    del cand[next(iter(cand))]
    with pytest.raises(g.GateInputError, match="1 reference episode\\(s\\) missing"):
        g.gate(ref, cand, allowed_drop=0.05)


def test_pairing_beats_unpaired_on_the_same_data():
    ref, cand = _runs(n=300, ref_fail=15, b=36, c=3)
    paired = g.gate(ref, cand, allowed_drop=0.05, mode="paired")
    unpaired = g.gate(ref, cand, allowed_drop=0.05, mode="unpaired")
    assert paired.ci[0] > unpaired.ci[0] and paired.mdd < unpaired.mdd


def test_max_mdd_turns_an_underpowered_pass_inconclusive():
    ref, cand = _runs(n=400)
    assert g.gate(ref, cand, allowed_drop=0.05).verdict == g.PASS
    d = g.gate(ref, cand, allowed_drop=0.05, max_mdd=0.02)
    assert d.verdict == g.INCONCLUSIVE and "--max-mdd" in d.explanation


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"allowed_drop": -0.1}, "allowed_drop"),
        ({"allowed_drop": 1.5}, "allowed_drop"),
        ({"allowed_drop": 0.05, "alpha": 0.7}, "alpha"),
        ({"allowed_drop": 0.05, "mode": "bayes"}, "mode"),
    ],
)
def test_bad_settings(kw, msg):
    with pytest.raises(g.GateInputError, match=msg) as ei:
        g.gate(*_runs(n=20), **kw)
    assert ei.value.exit_code == 2


def test_bad_outcomes():
    ref, cand = _runs(n=20)
    cand[next(iter(cand))] = "yes"
    with pytest.raises(g.GateInputError, match="success must be a bool"):
        g.gate(ref, cand, allowed_drop=0.05)
    with pytest.raises(g.GateInputError, match="empty"):
        g.gate(ref, {}, allowed_drop=0.05)


def test_sequential_design_spends_at_most_alpha_per_look_on_both_sides():
    d = g.design_sequential(120, allowed_drop=0.05, alpha=0.05, looks=4)
    assert d.looks == (30, 60, 90, 120) and len(d.pass_bounds) == 4  # a pass is a decision at every look
    for k, n_k in enumerate(d.looks):
        spend = g.spending_function("obrien-fleming", 0.05, n_k / 120) + 1e-12
        assert d.regression_spent[k] <= spend and d.pass_spent[k] <= spend
    assert d.regression_spent[-1] <= 0.05 and d.pass_spent[-1] <= 0.05
    if math.isfinite(d.regression_bounds[0]):  # look 1 on its own equals the one-look exact tail
        cnt = g._row_counts(g._paired_zstar(30, 0.05), d.regression_bounds[0])
        assert g._paired_sup_tail(cnt, 30, 0.05)[0] <= d.regression_spent[0] + 1e-6
    assert g.design_sequential(120, allowed_drop=0.05, looks=4, min_first=40).looks == (60, 90, 120)


def test_sequential_monitor_continue_regression_pass_and_inconclusive():
    n = 400
    design = g.design_sequential(n, allowed_drop=0.05, alpha=0.05, looks=4)
    ref, same = _runs(n=n, ref_fail=20)
    order = g.schedule_order(list(ref))
    assert order[:3] == [("libero_spatial", 0, 0, 7), ("libero_spatial", 1, 0, 7), ("libero_spatial", 2, 0, 7)]
    d = g.sequential_monitor(ref, {k: same[k] for k in order[:50]}, design=design)
    assert d.verdict == g.CONTINUE and d.sequential["episodes_done"] == 50
    bad = {k: (same[k] and i % 2 == 1) for i, k in enumerate(order)}  # a huge drop: caught at look 1
    d = g.sequential_monitor(ref, {k: bad[k] for k in order[:100]}, design=design)
    assert d.verdict == g.REGRESSION and d.n == 100 and d.sequential["look"] == 1
    d = g.sequential_monitor(ref, same, design=design)
    assert d.verdict == g.PASS and d.n <= n
    near = dict(same)  # a drop right at the allowance: no decision after the last look
    for k in [k for k in order if same[k]][::19][:20]:  # spread over the looks
        near[k] = False
    d = g.sequential_monitor(ref, near, design=design)
    assert d.verdict == g.INCONCLUSIVE and d.n == n and "more paired episodes" in d.explanation


def test_sequential_rejects_bad_designs():
    with pytest.raises(g.GateInputError, match="looks"):
        g.design_sequential(100, allowed_drop=0.05, looks=[50, 40, 100])
    with pytest.raises(g.GateInputError, match="spending"):
        g.design_sequential(100, allowed_drop=0.05, spending="magic")
