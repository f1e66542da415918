"""Seeded simulations: false-fail rate <= alpha at the boundary; power and savings are real."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytest_duquant import gate as g

SIMS = 3000
ALPHA = 0.05


def _se(p, m=SIMS):
    return math.sqrt(max(p * (1 - p), ALPHA * (1 - ALPHA)) / m)


def _paired_rate(rng, n, delta, pb, pc, sims=SIMS):
    cnt = rng.multinomial(n, [pb, pc, 1 - pb - pc], size=sims)
    u = g.paired_critical_value(n, delta, ALPHA)
    return float((g._paired_zstar(n, delta)[cnt[:, 0], cnt[:, 1]] >= u).mean())


@pytest.mark.parametrize(
    "n,delta,pc", [(150, 0.05, 0.0), (150, 0.05, 0.02), (300, 0.03, 0.01), (80, 0.1, 0.1)]
)
def test_paired_false_fail_at_boundary(n, delta, pc):
    rng = np.random.default_rng(n * 1000 + int(pc * 100))
    rate = _paired_rate(rng, n, delta, pc + delta, pc)
    assert rate <= ALPHA + 3 * _se(rate)
    # and the exact formula agrees with the simulation (validates paired_power, used for the MDD)
    ex = g.paired_power(n, delta, ALPHA, delta, pc)
    assert abs(rate - ex) <= 4 * math.sqrt(ex * (1 - ex) / SIMS) + 1e-3


def test_paired_false_fail_with_per_task_heterogeneity():
    rng = np.random.default_rng(11)
    n_task, tasks, delta = 20, 10, 0.05
    r = np.linspace(0.6, 1.0, tasks)
    pb = np.where(np.arange(tasks) < 2, 0.25 + 0.01, 0.01)  # drop concentrated in 2 tasks: mean drop = 0.05
    pc = np.full(tasks, 0.01)
    b = np.zeros(SIMS, int)
    c = np.zeros(SIMS, int)
    for t in range(tasks):
        m = rng.multinomial(n_task, [min(pb[t], r[t]), pc[t], 1 - min(pb[t], r[t]) - pc[t]], size=SIMS)
        b += m[:, 0]
        c += m[:, 1]
    n = n_task * tasks
    u = g.paired_critical_value(n, delta, ALPHA)
    rate = float((g._paired_zstar(n, delta)[b, c] >= u).mean())
    assert rate <= ALPHA + 3 * _se(rate)


@pytest.mark.parametrize("n1,n2,p2", [(150, 150, 0.9), (100, 200, 0.5)])
def test_unpaired_false_fail_at_boundary(n1, n2, p2):
    rng = np.random.default_rng(n1 + n2)
    delta = 0.05
    x1 = rng.binomial(n1, p2 + delta, SIMS)
    x2 = rng.binomial(n2, p2, SIMS)
    u = g.unpaired_critical_value(n1, n2, delta, ALPHA)
    rate = float((g._unpaired_zstar(n1, n2, delta)[x1, x2] >= u).mean())
    assert rate <= ALPHA + 3 * _se(rate)


def test_power_and_pairing_gain():
    rng = np.random.default_rng(5)
    n, delta, drop, pc, p_ref = 200, 0.05, 0.15, 0.01, 0.95
    paired = _paired_rate(rng, n, delta, pc + drop, pc)
    x1 = rng.binomial(n, p_ref, SIMS)
    x2 = rng.binomial(n, p_ref - drop, SIMS)
    u = g.unpaired_critical_value(n, n, delta, ALPHA)
    unpaired = float((g._unpaired_zstar(n, n, delta)[x1, x2] >= u).mean())
    assert paired > 0.9
    assert paired > unpaired + 0.05


def test_sequential_false_fail_power_and_savings():
    rng = np.random.default_rng(9)
    n, delta, sims = 300, 0.05, 2000
    design = g.design_sequential(n, allowed_drop=delta, alpha=ALPHA, looks=4)

    def run(pb, pc):
        b = np.zeros(sims, int)
        c = np.zeros(sims, int)
        verdict = np.full(sims, -1)
        used = np.full(sims, n)
        prev = 0
        for k, nk in enumerate(design.looks):
            inc = rng.multinomial(nk - prev, [pb, pc, 1 - pb - pc], size=sims)
            prev = nk
            b += inc[:, 0]
            c += inc[:, 1]
            act = verdict < 0
            reg = act & (g._paired_zstar(nk, delta)[b, c] >= design.regression_bounds[k])
            verdict[reg], used[reg] = 1, nk
            ps = (verdict < 0) & (g._paired_zstar(nk, -delta)[c, b] >= design.pass_bounds[k])
            verdict[ps], used[ps] = 0, nk
        return float((verdict == 1).mean()), float(used.mean())

    ff, _ = run(0.01 + delta, 0.01)
    assert ff <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / sims)
    power, used_bad = run(0.01 + 0.25, 0.01)
    assert power > 0.99 and used_bad < 0.5 * n  # a big drop stops early
    none, used_ok = run(0.01, 0.01)
    assert none == 0.0 and used_ok < 0.75 * n  # a clean candidate stops early with a pass


def test_sequential_exact_operating_characteristics_match_simulation_and_alpha():
    n, delta = 200, 0.05
    design = g.design_sequential(n, allowed_drop=delta, alpha=ALPHA, looks=4)
    for pc in (0.0, 0.01, 0.05, 0.2):
        oc = g.sequential_operating_characteristics(design, delta, pc)
        assert oc["regression"] <= oc["regression_without_pass_stops"] <= ALPHA + 1e-9
        assert g.sequential_operating_characteristics(design, delta, pc)["pass"] <= ALPHA + 1e-9
    rng = np.random.default_rng(21)
    sims, pc, drop = 4000, 0.01, 0.12
    oc = g.sequential_operating_characteristics(design, drop, pc)
    b = np.zeros(sims, int)
    c = np.zeros(sims, int)
    done = np.zeros(sims, bool)
    rej = np.zeros(sims, bool)
    used = np.full(sims, n)
    prev = 0
    for k, nk in enumerate(design.looks):
        inc = rng.multinomial(nk - prev, [pc + drop, pc, 1 - 2 * pc - drop], size=sims)
        prev = nk
        b += inc[:, 0]
        c += inc[:, 1]
        r = ~done & (g._paired_zstar(nk, delta)[b, c] >= design.regression_bounds[k])
        rej |= r
        used[r] = nk
        done |= r
        p = ~done & (g._paired_zstar(nk, -delta)[c, b] >= design.pass_bounds[k])
        used[p] = nk
        done |= p
    assert abs(rej.mean() - oc["regression"]) <= 4 * math.sqrt(oc["regression"] * (1 - oc["regression"]) / sims)
    assert abs(used.mean() - oc["expected_pairs"]) <= 4 * used.std() / math.sqrt(sims)
