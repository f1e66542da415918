"""Exactness of the gate's tests: statistics, p-values and intervals against brute-force enumeration."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest

from pytest_duquant import gate as g


def _brute_paired_z(b, c, n, d):
    """Score statistic from a brute-force restricted MLE (fine grid on the boundary p_b = p_c + d)."""
    lo, hi = max(0.0, -d), (1.0 - d) / 2.0
    x = np.linspace(lo, hi, 200001)
    pb, pc, pa = x + d, x, 1.0 - 2 * x - d
    with np.errstate(divide="ignore", invalid="ignore"):
        ll = (
            np.where(b > 0, b * np.log(pb), 0.0)
            + np.where(c > 0, c * np.log(pc), 0.0)
            + np.where(n - b - c > 0, (n - b - c) * np.log(np.clip(pa, 0, None)), 0.0)
        )
    i = int(np.nanargmax(ll))
    var = pb[i] + pc[i] - d * d
    num = b - c - n * d
    return 0.0 if abs(num) < 1e-12 else num / math.sqrt(n * var)


@pytest.mark.parametrize("n", [6, 9])
@pytest.mark.parametrize("d", [0.0, 0.1, 0.3, -0.2])
def test_paired_statistic_matches_brute_force_mle_and_is_monotone(n, d):
    zs = g._paired_zstar(n, d)
    raw = {(b, c): _brute_paired_z(b, c, n, d) for b in range(n + 1) for c in range(n + 1 - b)}
    for b, c in raw:
        # envelope = max over b' <= b, c' >= c of the raw statistic
        env = max(v for (bb, cc), v in raw.items() if bb <= b and cc >= c)
        assert zs[b, c] == pytest.approx(env, abs=2e-3), (b, c)
    for b in range(n + 1):
        for c in range(n - b):
            assert zs[b, c] >= zs[b, c + 1]
            assert zs[b + 1, c] >= zs[b, c]


def _brute_paired_tail(n, region, pb, pc):
    """Sum of the probabilities of all 3^n episode sequences whose (b, c) lies in the region.

    The sequences are enumerated once per n (itertools, no multinomial formula) and grouped by (b, c).
    """
    total = 0.0
    for (b, c), count in _sequence_counts(n).items():
        if (b, c) in region:
            total += count * pb**b * pc**c * (1.0 - pb - pc) ** (n - b - c)
    return total


@functools.cache
def _sequence_counts(n):
    counts = {}
    for seq in itertools.product(range(3), repeat=n):
        key = (seq.count(0), seq.count(1))
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("n,d", [(6, 0.0), (6, 0.15), (7, 0.3)])
def test_paired_pvalue_is_the_worst_case_over_the_whole_composite_null(n, d):
    zs = g._paired_zstar(n, d)
    cells = [(b, c) for b in range(n + 1) for c in range(n + 1 - b)]
    for b, c in [(3, 0), (2, 1), (n, 0), (1, 1), (0, 2), (4, 1)]:
        if b + c > n:
            continue
        region = {cell for cell in cells if zs[cell] >= zs[b, c]}
        # (i) the boundary segment, fine grid
        lo, hi = max(0.0, -d), (1 - d) / 2
        boundary = max(_brute_paired_tail(n, region, x + d, x) for x in np.linspace(lo, hi, 301))
        # (ii) interior points of the null {p_b - p_c <= d}: never larger than the boundary sup
        inner = max(
            _brute_paired_tail(n, region, pb, pc)
            for pb in np.linspace(0, 1, 21)
            for pc in np.linspace(0, 1, 21)
            if pb + pc <= 1 + 1e-12 and pb - pc <= d + 1e-12
        )
        p = g.paired_pvalue(b, c, n, d)
        assert p == pytest.approx(boundary, abs=2e-4), (b, c)
        assert p >= boundary - 1e-9
        assert inner <= p + 1e-9, (b, c, inner, p)


def _brute_unpaired_tail(n1, n2, region, p1, p2):
    """Reference arm: enumerate its 2^n1 sequences (grouped by success count); candidate arm: binomial sum."""
    total = 0.0
    for x1, count in _binary_counts(n1).items():
        w1 = count * p1**x1 * (1 - p1) ** (n1 - x1)
        for x2 in range(n2 + 1):
            if (x1, x2) in region:
                total += w1 * math.comb(n2, x2) * p2**x2 * (1 - p2) ** (n2 - x2)
    return total


@functools.cache
def _binary_counts(n):
    counts = {}
    for seq in itertools.product((0, 1), repeat=n):
        counts[sum(seq)] = counts.get(sum(seq), 0) + 1
    return counts


@pytest.mark.parametrize("d", [0.0, 0.2])
def test_unpaired_pvalue_against_enumeration(d):
    n1, n2 = 7, 5
    zs = g._unpaired_zstar(n1, n2, d)
    for x1, x2 in [(7, 2), (6, 3), (5, 5), (7, 0), (3, 1)]:
        region = {(a, b) for a in range(n1 + 1) for b in range(n2 + 1) if zs[a, b] >= zs[x1, x2]}
        grid = np.linspace(max(0, -d), min(1, 1 - d), 401)
        boundary = max(_brute_unpaired_tail(n1, n2, region, x + d, x) for x in grid)
        inner = max(
            _brute_unpaired_tail(n1, n2, region, p1, p2)
            for p1 in np.linspace(0, 1, 21)
            for p2 in np.linspace(0, 1, 21)
            if p1 - p2 <= d + 1e-12
        )
        p = g.unpaired_pvalue(x1, n1, x2, n2, d)
        assert p == pytest.approx(boundary, abs=2e-4), (x1, x2)
        assert inner <= p + 1e-9


@pytest.mark.parametrize("d", [0.0, 0.05, 0.3, -0.1])
def test_farrington_manning_rmle_maximizes_the_restricted_likelihood(d):
    n1, n2 = 12, 9
    for x1 in range(0, n1 + 1, 3):
        for x2 in range(0, n2 + 1, 2):
            t1, t2 = g._unpaired_rmle(np.array(x1 / n1), np.array(x2 / n2), n1, n2, d)
            p2 = np.linspace(max(0, -d), min(1, 1 - d), 100001)
            p1 = p2 + d
            with np.errstate(divide="ignore", invalid="ignore"):
                ll = (
                    np.where(x1 > 0, x1 * np.log(p1), 0)
                    + np.where(n1 - x1 > 0, (n1 - x1) * np.log(1 - p1), 0)
                    + np.where(x2 > 0, x2 * np.log(p2), 0)
                    + np.where(n2 - x2 > 0, (n2 - x2) * np.log(1 - p2), 0)
                )
            assert float(t2) == pytest.approx(p2[int(np.nanargmax(ll))], abs=1e-4)
            assert float(t1 - t2) == pytest.approx(d, abs=1e-12)


def test_pvalue_is_monotone_in_the_evidence():
    n, d = 60, 0.05
    p = [g.paired_pvalue(b, 2, n, d) for b in range(2, 20)]
    assert all(x >= y - 1e-12 for x, y in zip(p, p[1:], strict=False))
    assert p[0] > 0.5 and p[-1] < 0.001


@pytest.mark.parametrize("b,c,n", [(12, 1, 80), (8, 3, 80), (20, 2, 150), (5, 5, 40), (12, 1, 100)])
def test_paired_lower_bound_is_valid_and_monotone(b, c, n):
    """Every allowed drop below L is rejected (so a verdict read off L is valid and monotone in delta),
    although the exact p-value itself is not monotone in delta (audit item 6)."""
    lo, hi = g._paired_ci(b, c, n, 0.05)
    assert lo <= (b - c) / n <= hi
    step = g.grid_step(n)
    for d in np.arange(lo - 0.05, lo, step / 3):
        assert g.paired_pvalue(b, c, n, float(d)) <= 0.05, d
    assert g.paired_pvalue(b, c, n, lo + 3e-4) > 0.05 or g.paired_pvalue(b, c, n, lo + 1e-3) > 0.05


def test_the_exact_pvalue_is_not_monotone_in_delta_but_the_verdict_is():
    """Audit 6: (12, 1) of 100 pairs is rejected at delta 0.05 but not at 0.0475 (the old gate said
    REGRESSION at the larger allowance and PASS at the smaller); the interval-based verdict is monotone."""
    assert g.paired_pvalue(12, 1, 100, 0.05) <= 0.05 < g.paired_pvalue(12, 1, 100, 0.0475)
    lo, hi = g._paired_ci(12, 1, 100, 0.05)
    verdicts = [g.verdict_of((lo, hi), d) for d in np.arange(0.0, 0.3, 0.0025)]
    rank = {g.REGRESSION: 0, g.INCONCLUSIVE: 1, g.PASS: 2}
    assert [rank[v] for v in verdicts] == sorted(rank[v] for v in verdicts)
    assert g.verdict_of((lo, hi), 0.05) != g.REGRESSION and lo < 0.0475


def test_unpaired_ci_is_consistent_with_the_test():
    x1, n1, x2, n2 = 57, 60, 45, 60
    lo, hi = g._unpaired_ci(x1, n1, x2, n2, 0.05)
    assert lo <= x1 / n1 - x2 / n2 <= hi
    for d in (0.0, 0.05, 0.1, 0.15):
        if lo > d:
            assert g.unpaired_pvalue(x1, n1, x2, n2, d) <= 0.05


def test_verdict_table_agrees_with_gate():
    n, delta = 60, 0.1
    table = g.verdict_table(n, delta, 0.05)
    code = {g.REGRESSION: 1, g.PASS: 0, g.INCONCLUSIVE: -1}
    keys = [("s", 0, i, 7) for i in range(n)]
    for b, c in [(0, 0), (2, 0), (10, 1), (14, 2), (20, 0), (6, 3)]:
        ref = {k: i >= c for i, k in enumerate(keys)}
        cand = {k: (i < c) or (i >= c + b and ref[k]) for i, k in enumerate(keys)}
        d = g.gate(ref, cand, allowed_drop=delta)
        assert (d.b, d.c) == (b, c)
        assert table[b, c] == code[d.verdict], (b, c, d.ci)
    assert table[n, 1] == -2  # infeasible


def test_clopper_pearson_closed_forms_and_tail_equations():
    n = 10
    lo, hi = g.clopper_pearson(0, n, 0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / n), abs=1e-9)
    lo, hi = g.clopper_pearson(n, n, 0.95)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / n), abs=1e-9)
    lo, hi = g.clopper_pearson(3, 10, 0.9)
    assert 1 - g.binom_cdf(2, 10, lo) == pytest.approx(0.05, abs=1e-9)
    assert g.binom_cdf(3, 10, hi) == pytest.approx(0.05, abs=1e-9)


def test_power_and_critical_value_agree_with_pvalues():
    n, d, a = 120, 0.05, 0.05
    u = g.paired_critical_value(n, d, a)
    zs = g._paired_zstar(n, d)
    for b, c in [(10, 1), (14, 2), (16, 2), (25, 0), (9, 3)]:
        assert (g.paired_pvalue(b, c, n, d) <= a) == (zs[b, c] >= u)
    assert g.paired_power(n, d, a, d, 0.01) <= a
    assert g.paired_power(n, d, a, 0.25, 0.01) > 0.99
