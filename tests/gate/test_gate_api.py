"""gate() / sequential_monitor(): verdicts, modes, reported numbers, input errors."""

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
    assert d.p_value == pytest.approx(g.paired_pvalue(30, 2, 200, 0.05)) and d.p_value < 0.05
    assert d.ci[0] > 0.05 and d.ci[0] < d.drop < d.ci[1] and d.ci_level == pytest.approx(0.9)
    assert 0.05 < d.mdd < 0.2
    assert "REGRESSION" in d.explanation and "30 reference-only" in d.explanation
    assert d.to_dict()["threshold"] == pytest.approx(0.95 - 0.05)


def test_identical_runs_pass_and_mdd_shrinks_with_n():
    small = g.gate(*_runs(n=100), allowed_drop=0.05)
    big = g.gate(*_runs(n=400), allowed_drop=0.05)
    assert small.verdict == big.verdict == g.PASS
    assert small.p_value > 0.5 and small.drop == 0
    assert big.mdd < small.mdd
    assert small.ci[1] > 0 > small.ci[0] - 1e-9 or small.ci[0] <= 0 <= small.ci[1]


def test_drop_below_allowance_is_not_a_regression_but_above_is():
    # observed drop 4% with delta 5%: pass; same data with delta 0: regression
    ref, cand = _runs(n=400, ref_fail=20, b=16, c=0)
    assert g.gate(ref, cand, allowed_drop=0.05).verdict == g.PASS
    assert g.gate(ref, cand, allowed_drop=0.0).verdict == g.REGRESSION


def test_auto_mode_chooses_unpaired_without_shared_episodes():
    ref, _ = _runs(n=200, ref_fail=10)
    cand = {("libero_spatial", i % 10, i // 10, 8): i >= 60 for i in range(200)}  # other seed: no shared keys
    d = g.gate(ref, cand, allowed_drop=0.05)
    assert d.mode == "unpaired" and d.verdict == g.REGRESSION
    assert (d.n_reference, d.n_candidate, d.reference_successes, d.candidate_successes) == (
        200,
        200,
        190,
        140,
    )
    assert d.b is None and d.p_value == pytest.approx(g.unpaired_pvalue(190, 200, 140, 200, 0.05))
    with pytest.raises(g.GateInputError, match="share no episode"):
        g.gate(ref, cand, allowed_drop=0.05, mode="paired")


def test_paired_ignores_unshared_episodes_and_reports_them():
    ref, cand = _runs(n=200)
    cand[("libero_goal", 0, 0, 7)] = False
    d = g.gate(ref, cand, allowed_drop=0.05, mode="paired")
    assert d.n == 200 and d.ignored_candidate == 1 and d.ignored_reference == 0


def test_pairing_beats_unpaired_on_the_same_data():
    ref, cand = _runs(n=300, ref_fail=15, b=36, c=3)
    paired = g.gate(ref, cand, allowed_drop=0.05, mode="paired", confidence_interval=False)
    unpaired = g.gate(ref, cand, allowed_drop=0.05, mode="unpaired", confidence_interval=False)
    assert paired.p_value < unpaired.p_value
    assert paired.mdd < unpaired.mdd


def test_max_mdd_gives_inconclusive():
    d = g.gate(*_runs(n=40), allowed_drop=0.05, max_mdd=0.05)
    assert d.verdict == g.INCONCLUSIVE and "INCONCLUSIVE" in d.explanation


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


def test_sequential_design_spends_at_most_alpha_per_look():
    d = g.design_sequential(120, allowed_drop=0.05, alpha=0.05, looks=4)
    assert d.looks == (30, 60, 90, 120)
    for k, n_k in enumerate(d.looks):
        assert d.regression_spent[k] <= g.spending_function("obrien-fleming", 0.05, n_k / 120) + 1e-12
    assert all(a <= b + 1e-15 for a, b in zip(d.regression_spent, d.regression_spent[1:], strict=False))
    assert d.regression_spent[-1] <= 0.05
    # exact check of look 1 on its own: P(reject at look 1) at the boundary = one-look tail
    if math.isfinite(d.regression_bounds[0]):
        cnt = g._row_counts(g._paired_zstar(30, 0.05), d.regression_bounds[0])
        tail = g._paired_sup_tail(cnt, 30, 0.05)[0]
        assert tail <= d.regression_spent[0] + 1e-6


def test_sequential_monitor_continue_regression_and_early_pass():
    n = 400
    design = g.design_sequential(n, allowed_drop=0.05, alpha=0.05, looks=4)
    ref, same = _runs(n=n, ref_fail=20)
    order = g.schedule_order(list(ref))
    assert order[:3] == [
        ("libero_spatial", 0, 0, 7),
        ("libero_spatial", 1, 0, 7),
        ("libero_spatial", 2, 0, 7),
    ]
    partial = {k: same[k] for k in order[:50]}
    d = g.sequential_monitor(ref, partial, design=design)
    assert d.verdict == g.CONTINUE and d.sequential["episodes_done"] == 50
    # a huge drop is caught at the first look (100 pairs)
    bad = {k: (v and i % 2 == 1) for i, (k, v) in enumerate((k, same[k]) for k in order)}
    d = g.sequential_monitor(ref, {k: bad[k] for k in order[:100]}, design=design)
    assert d.verdict == g.REGRESSION and d.n == 100 and d.sequential["look"] == 1
    # identical runs: pass before the last look
    d = g.sequential_monitor(ref, same, design=design)
    assert d.verdict == g.PASS and d.n < n and "early" in d.explanation


def test_sequential_rejects_bad_designs():
    with pytest.raises(g.GateInputError, match="looks"):
        g.design_sequential(100, allowed_drop=0.05, looks=[50, 40, 100])
    with pytest.raises(g.GateInputError, match="spending"):
        g.design_sequential(100, allowed_drop=0.05, spending="magic")
