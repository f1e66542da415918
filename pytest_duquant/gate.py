"""Gate statistics: is a quantized policy's success rate worse than the reference's by more than allowed?

Pure numerics (numpy + the standard library): no pytest, no I/O, no simulator.

A *regression* is declared only when a one-sided test rejects

    H0: true drop <= allowed_drop (delta)      drop = p_ref - p_cand

at level alpha. Two exact tests are provided (docs/gate.md has the derivations and the
simulation evidence):

* **paired** (default when both runs share episodes, keys = (suite, task_id, trial, seed)).
  Per shared episode the pair falls in one of three cells: ``b`` = reference success and candidate
  failure, ``c`` = reference failure and candidate success, or concordant. The counts are
  trinomial(n; p_b, p_c, 1 - p_b - p_c) and drop = p_b - p_c. The test statistic is Tango's
  score statistic for a paired difference under the restricted maximum-likelihood estimate,
  made monotone (non-decreasing in b, non-increasing in c) by a running-max envelope. The
  p-value is the worst case over the nuisance parameter (an exact *unconditional* test):
  because the rejection region is monotone, the worst case over the whole composite null
  {p_b - p_c <= delta} lies on the boundary p_b = p_c + delta (a coupling argument), a
  one-dimensional segment that is searched by a grid plus golden-section refinement.
* **unpaired** (runs without shared episodes): two independent binomials; Farrington-Manning
  score statistic with the same monotone envelope and the same worst case over the boundary
  p_ref = p_cand + delta (Chan's exact unconditional test for a shifted difference).

Confidence intervals invert the same tests (each side one-sided at alpha, so the interval is a
1 - 2 alpha two-sided one and its lower end is consistent with the verdict). The minimum
detectable drop (MDD) is the smallest true drop the exact test rejects with the requested power
at the run's size, with the nuisance parameter at its observed value.

Sequential mode (paired): group-sequential looks at planned numbers of pairs with an
alpha-spending function (O'Brien-Fleming-like by default). Critical values are chosen by an
exact dynamic program over the trinomial process so that the *exact* worst-case probability of a
false regression by look k never exceeds alpha(t_k); a run may also stop early with a pass when
the reverse test rejects "drop >= pass_drop" (non-binding, so it can only lower the false-fail
rate).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = [
    "CONTINUE",
    "INCONCLUSIVE",
    "PASS",
    "REGRESSION",
    "GateDecision",
    "GateInputError",
    "SequentialDesign",
    "binom_cdf",
    "clopper_pearson",
    "design_sequential",
    "gate",
    "paired_critical_value",
    "paired_power",
    "paired_pvalue",
    "paired_statistic",
    "schedule_order",
    "sequential_monitor",
    "sequential_operating_characteristics",
    "spending_function",
    "unpaired_critical_value",
    "unpaired_power",
    "unpaired_pvalue",
    "unpaired_statistic",
]

PASS = "pass"
REGRESSION = "regression"
INCONCLUSIVE = "inconclusive"
CONTINUE = "continue"

_GRID = 49  # nuisance grid points (Chebyshev spacing) before golden-section refinement
_WINDOW_SD = 9.0  # probability windows: mean +- 9 sd (+4): neglected mass < 1e-18


class GateInputError(ValueError):
    """The outcomes or settings cannot be judged (CLI exit code 2). The message says what and why."""

    exit_code = 2


# --------------------------------------------------------------------------------------------
# decision record
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and every number behind it.

    ``drop``/``ci``/``mdd``/``allowed_drop`` are in success-rate units (0.05 = 5 points).
    ``ci`` is the exact interval of the true drop, each side one-sided at ``alpha``
    (so ``ci_level`` = 1 - 2 alpha); regression <=> ``ci[0] > allowed_drop`` up to bisection tolerance.
    """

    verdict: str
    mode: str
    alpha: float
    allowed_drop: float
    p_value: float | None
    ci: tuple[float, float] | None
    ci_level: float | None
    mdd: float | None
    power: float
    n: int
    n_reference: int
    n_candidate: int
    reference_successes: int
    candidate_successes: int
    reference_rate: float
    candidate_rate: float
    drop: float
    b: int | None = None
    c: int | None = None
    ignored_reference: int = 0
    ignored_candidate: int = 0
    explanation: str = ""
    sequential: dict[str, Any] | None = field(default=None)

    @property
    def threshold(self) -> float:
        """The candidate success rate below which the point estimate alone would exceed the allowed drop."""
        return self.reference_rate - self.allowed_drop

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci) if self.ci is not None else None
        d["threshold"] = self.threshold
        return d


# --------------------------------------------------------------------------------------------
# small exact helpers
# --------------------------------------------------------------------------------------------

_LOGFACT = np.zeros(1)


def _logfact(n: int) -> np.ndarray:
    """log k! for k = 0..n (math.lgamma, exact to double precision)."""
    global _LOGFACT
    if _LOGFACT.shape[0] <= n:
        m = max(n + 1, 2 * _LOGFACT.shape[0], 1024)
        _LOGFACT = np.array([math.lgamma(k + 1.0) for k in range(m)])
    return _LOGFACT


def _klogp(k: np.ndarray, p: float) -> np.ndarray:
    """k * log(p) with 0 * log(0) = 0."""
    if p <= 0.0:
        return np.where(k == 0, 0.0, -np.inf)
    return k * math.log(min(p, 1.0))


def _binom_pmf(n: int, p: float) -> np.ndarray:
    lf = _logfact(n)
    k = np.arange(n + 1)
    logp = lf[n] - lf[k] - lf[n - k] + _klogp(k, p) + _klogp(n - k, 1.0 - p)
    return np.exp(logp)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), exact summation."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(min(1.0, _binom_pmf(n, p)[: k + 1].sum()))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a binomial proportion with k successes in n."""
    if n <= 0 or not 0 <= k <= n:
        raise GateInputError(f"clopper_pearson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise GateInputError(f"clopper_pearson: confidence={confidence} must be in (0, 1)")
    tail = (1.0 - confidence) / 2.0

    def solve(f: Callable[[float], float]) -> float:  # f increasing in p, root of f(p) = 0
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if f(mid) < 0:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    lower = 0.0 if k == 0 else solve(lambda p: (1.0 - binom_cdf(k - 1, n, p)) - tail)
    upper = 1.0 if k == n else solve(lambda p: tail - binom_cdf(k, n, p))
    return lower, upper


def _cheb_grid(lo: float, hi: float, m: int = _GRID) -> np.ndarray:
    u = np.linspace(0.0, 1.0, m)
    return lo + (hi - lo) * (1.0 - np.cos(np.pi * u)) / 2.0


def _sup(f: Callable[[float], float], lo: float, hi: float, grid: int = _GRID) -> tuple[float, float]:
    """Max of f on [lo, hi]: Chebyshev grid, then golden-section refinement around the best point."""
    if hi - lo <= 1e-15:
        return f(lo), lo
    xs = _cheb_grid(lo, hi, grid)
    vals = [f(float(x)) for x in xs]
    i = int(np.argmax(vals))
    best, arg = vals[i], float(xs[i])
    a, bnd = float(xs[max(i - 1, 0)]), float(xs[min(i + 1, len(xs) - 1)])
    g = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = bnd - g * (bnd - a), a + g * (bnd - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(16):
        if f1 >= f2:
            bnd, x2, f2 = x2, x1, f1
            x1 = bnd - g * (bnd - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + g * (bnd - a)
            f2 = f(x2)
        for fx, xx in ((f1, x1), (f2, x2)):
            if fx > best:
                best, arg = fx, xx
    return best, arg


def _grid_cache(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Memoize statistic grids, keeping at most ~40M cells (320 MB) in total, least recently used out."""
    store: OrderedDict[tuple, np.ndarray] = OrderedDict()
    budget = 40_000_000

    @functools.wraps(fn)
    def wrapper(*args: Any) -> np.ndarray:
        hit = store.get(args)
        if hit is not None:
            store.move_to_end(args)
            return hit
        out = fn(*args)
        store[args] = out
        while len(store) > 1 and sum(a.size for a in store.values()) > budget:
            store.popitem(last=False)
        return out

    wrapper.cache_clear = store.clear  # type: ignore[attr-defined]
    return wrapper


def _envelope(z: np.ndarray) -> np.ndarray:
    """Smallest array >= z that is non-decreasing along axis 0 and non-increasing along axis 1."""
    z = np.maximum.accumulate(z, axis=0)
    return np.maximum.accumulate(z[:, ::-1], axis=1)[:, ::-1]


def _check_delta(delta: float, name: str = "allowed_drop") -> float:
    delta = float(delta)
    if not -1.0 < delta < 1.0 or math.isnan(delta):
        raise GateInputError(f"{name}={delta}: must be in (-1, 1) (a drop in success rate, 0.05 = 5 points)")
    return delta


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 0.5:
        raise GateInputError(f"{name}={alpha}: must be in (0, 0.5)")
    return alpha


# --------------------------------------------------------------------------------------------
# paired test
# --------------------------------------------------------------------------------------------


def _paired_rmle(b: np.ndarray, c: np.ndarray, n: int, d: float) -> tuple[np.ndarray, np.ndarray]:
    """Restricted MLE (p_b, p_c) of the trinomial under p_b - p_c = d >= 0 (2n x^2 - B x - c d(1-d) = 0)."""
    big_b = (b + c) - d * (2 * n - b + c)
    x = (big_b + np.sqrt(big_b * big_b + 8.0 * n * c * d * (1.0 - d))) / (4.0 * n)
    x = np.clip(x, 0.0, (1.0 - d) / 2.0)
    return x + d, x


@_grid_cache
def _paired_zstar(n: int, delta: float) -> np.ndarray:
    # Tango's statistic on the (b, c) grid, written with in-place operations (n = 4500 is 20M cells).
    # Rows are b, columns c. For delta < 0 the restricted MLE is that of the swapped problem (c, b; -delta);
    # only p_b + p_c = 2x + |delta| enters the variance, which is symmetric.
    d = abs(delta)
    r = np.arange(n + 1, dtype=float)
    if delta >= 0:  # B = (1 + d) b + (1 - d) c - 2 n d; the c-role count is c
        big_b = ((1 + d) * r - 2 * n * d)[:, None] + ((1 - d) * r)[None, :]
        x = big_b * big_b
        x += (8.0 * n * d * (1.0 - d)) * r[None, :]
    else:  # roles swapped: B = (1 + d) c + (1 - d) b - 2 n d; the c-role count is b
        big_b = ((1 - d) * r - 2 * n * d)[:, None] + ((1 + d) * r)[None, :]
        x = big_b * big_b
        x += (8.0 * n * d * (1.0 - d)) * r[:, None]
    np.sqrt(x, out=x)
    x += big_b
    del big_b
    x *= 1.0 / (4.0 * n)
    np.clip(x, 0.0, (1.0 - d) / 2.0, out=x)
    # den = sqrt(n (p_b + p_c - delta^2)) = sqrt(n (2x + d - d^2))
    x *= 2.0 * n
    x += n * (d - d * d)
    np.maximum(x, 0.0, out=x)
    np.sqrt(x, out=x)
    z = (r - n * delta)[:, None] - r[None, :]  # numerator b - c - n delta
    small = x <= 1e-12
    np.divide(z, x, out=z, where=~small)
    if small.any():
        z[small] = np.sign(z[small]) * 1e6
    del x, small
    z[(r[:, None] + r[None, :]) > n] = -np.inf
    np.maximum.accumulate(z, axis=0, out=z)
    zr = z[:, ::-1]
    np.maximum.accumulate(zr, axis=1, out=zr)
    z.setflags(write=False)
    return z


def paired_statistic(b: int, c: int, n: int, delta: float) -> float:
    """Monotone Tango score statistic of (b, c) among n pairs for H0: drop <= delta (larger = more drop)."""
    _check_pairs(b, c, n)
    return float(_paired_zstar(n, _check_delta(delta))[b, c])


def _check_pairs(b: int, c: int, n: int) -> None:
    if n < 1 or b < 0 or c < 0 or b + c > n:
        raise GateInputError(f"paired counts b={b}, c={c}, n={n}: need n >= 1, b, c >= 0, b + c <= n")


def _row_counts(zs: np.ndarray, u: float) -> np.ndarray:
    """cnt[i] = number of j with zs[i, j] >= u (a prefix, since rows are non-increasing)."""
    return (zs >= u).sum(axis=1)


def _paired_tail(cnt: np.ndarray, n: int, pb: float, pc: float) -> float:
    """P((B, C) in region) under trinomial(n; pb, pc); the region is {c < cnt[b]} (monotone)."""
    pb = min(max(pb, 0.0), 1.0)
    pc = min(max(pc, 0.0), 1.0 - pb)
    pa = max(1.0 - pb - pc, 0.0)
    lf = _logfact(n)
    sb = math.sqrt(n * pb * (1 - pb))
    sc = math.sqrt(n * pc * (1 - pc))
    b0 = max(0, int(n * pb - _WINDOW_SD * sb - 4))
    b1 = min(n, int(math.ceil(n * pb + _WINDOW_SD * sb + 4)))
    c0 = max(0, int(n * pc - _WINDOW_SD * sc - 4))
    c1 = min(n, int(math.ceil(n * pc + _WINDOW_SD * sc + 4)))
    b = np.arange(b0, b1 + 1)[:, None]
    c = np.arange(c0, c1 + 1)[None, :]
    a = n - b - c
    mask = (a >= 0) & (c < cnt[b0 : b1 + 1][:, None])
    if not mask.any():
        return 0.0
    ac = np.maximum(a, 0)
    logp = lf[n] - lf[b] - lf[c] - lf[ac] + _klogp(b, pb) + _klogp(c, pc) + _klogp(ac, pa)
    return float(np.exp(logp[mask]).sum())


def _paired_nuisance_range(delta: float) -> tuple[float, float]:
    return max(0.0, -delta), (1.0 - delta) / 2.0


def _paired_sup_tail(cnt: np.ndarray, n: int, delta: float) -> tuple[float, float]:
    lo, hi = _paired_nuisance_range(delta)
    p, x = _sup(lambda x: _paired_tail(cnt, n, x + delta, x), lo, hi)
    return min(p, 1.0), x


def paired_pvalue(b: int, c: int, n: int, delta: float) -> float:
    """Exact unconditional p-value of H0: p_b - p_c <= delta given b, c among n pairs."""
    _check_pairs(b, c, n)
    delta = _check_delta(delta)
    zs = _paired_zstar(n, delta)
    return _paired_sup_tail(_row_counts(zs, zs[b, c]), n, delta)[0]


def paired_critical_value(n: int, delta: float, alpha: float) -> float:
    """Smallest value u of the statistic with sup-null P(Z* >= u) <= alpha (inf: cannot reject at this n)."""
    delta = _check_delta(delta)
    zs = _paired_zstar(n, delta)
    b = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    vals = np.unique(zs[(b + c) <= n])
    return _critical(vals, lambda u: _paired_sup_tail(_row_counts(zs, u), n, delta)[0], alpha)


def _critical(vals: np.ndarray, g: Callable[[float], float], alpha: float) -> float:
    """Smallest v in sorted vals with g(v) <= alpha; g is non-increasing."""
    if g(float(vals[-1])) > alpha:
        return math.inf
    lo, hi = 0, len(vals) - 1  # g(vals[hi]) <= alpha
    while lo < hi:
        mid = (lo + hi) // 2
        if g(float(vals[mid])) <= alpha:
            hi = mid
        else:
            lo = mid + 1
    return float(vals[hi])


def paired_power(
    n: int, delta: float, alpha: float, drop: float, p_c: float, *, crit: float | None = None
) -> float:
    """Exact power of the paired test (n pairs) at true drop `drop` and P(ref fail, cand success) = p_c."""
    delta = _check_delta(delta)
    if crit is None:
        crit = paired_critical_value(n, delta, alpha)
    if math.isinf(crit):
        return 0.0
    return _paired_tail(_row_counts(_paired_zstar(n, delta), crit), n, p_c + drop, p_c)


def _paired_mdd(n: int, delta: float, alpha: float, p_c: float, power: float) -> float | None:
    crit = paired_critical_value(n, delta, alpha)
    if math.isinf(crit):
        return None
    cnt = _row_counts(_paired_zstar(n, delta), crit)
    hi = 1.0 - 2.0 * p_c
    if hi <= delta or _paired_tail(cnt, n, p_c + hi, p_c) < power:
        return None
    return _bisect_increasing(lambda d: _paired_tail(cnt, n, p_c + d, p_c) - power, delta, hi)


def _bisect_increasing(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-4) -> float:
    """Smallest x in [lo, hi] with f(x) >= 0 for f non-decreasing, f(hi) >= 0."""
    if f(lo) >= 0:
        return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if f(mid) >= 0:
            hi = mid
        else:
            lo = mid
    return hi


def _lower_bound(
    pfun: Callable[[float], float], alpha: float, est: float, se: float, tol: float = 5e-4
) -> float:
    """sup{d : pfun(d) <= alpha}: the exact one-sided (1 - alpha) lower confidence bound of the drop."""
    eps = 1e-6
    lo = max(-1.0 + eps, est - 4.0 * se - 0.01)
    hi = min(1.0 - eps, est)
    if pfun(lo) > alpha:
        lo = -1.0 + eps
        if pfun(lo) > alpha:
            return -1.0
    if pfun(hi) <= alpha:
        hi = 1.0 - eps
        if pfun(hi) <= alpha:
            return 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if pfun(mid) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def _paired_ci(b: int, c: int, n: int, alpha: float) -> tuple[float, float]:
    est = (b - c) / n
    se = math.sqrt(max((b + c) / n - est * est, 1.0 / n) / n)
    lower = _lower_bound(lambda d: paired_pvalue(b, c, n, d), alpha, est, se)
    upper = -_lower_bound(lambda d: paired_pvalue(c, b, n, d), alpha, -est, se)
    return lower, upper


# --------------------------------------------------------------------------------------------
# unpaired test
# --------------------------------------------------------------------------------------------


def _unpaired_rmle(
    p1: np.ndarray, p2: np.ndarray, n1: int, n2: int, d: float
) -> tuple[np.ndarray, np.ndarray]:
    """Farrington-Manning restricted MLE (p1, p2) under p1 - p2 = d (closed-form cubic root)."""
    th = n2 / n1
    a = 1.0 + th
    bb = -(1.0 + th + p1 + th * p2 + d * (th + 2.0))
    cc = d * d + d * (2.0 * p1 + th + 1.0) + p1 + th * p2
    dd = -p1 * d * (1.0 + d)
    v = bb**3 / (27.0 * a**3) - bb * cc / (6.0 * a * a) + dd / (2.0 * a)
    u = np.sign(v) * np.sqrt(np.maximum(bb * bb / (9.0 * a * a) - cc / (3.0 * a), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(u != 0, v / np.where(u != 0, u, 1.0) ** 3, 0.0)
    w = (math.pi + np.arccos(np.clip(ratio, -1.0, 1.0))) / 3.0
    t1 = 2.0 * u * np.cos(w) - bb / (3.0 * a)
    t2 = np.clip(t1 - d, max(0.0, -d), min(1.0, 1.0 - d))
    return t2 + d, t2


@_grid_cache
def _unpaired_zstar(n1: int, n2: int, delta: float) -> np.ndarray:
    x1 = np.arange(n1 + 1, dtype=float)[:, None]
    x2 = np.arange(n2 + 1, dtype=float)[None, :]
    p1, p2 = x1 / n1, x2 / n2
    t1, t2 = _unpaired_rmle(p1, p2, n1, n2, delta)
    num = p1 - p2 - delta
    var = t1 * (1 - t1) / n1 + t2 * (1 - t2) / n2
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(var > 1e-15, num / np.sqrt(np.where(var > 1e-15, var, 1.0)), np.sign(num) * 1e6)
    z = np.where(np.abs(num) < 1e-12, 0.0, z)
    out = _envelope(z)
    out.setflags(write=False)
    return out


def unpaired_statistic(x_ref: int, n_ref: int, x_cand: int, n_cand: int, delta: float) -> float:
    """Monotone Farrington-Manning statistic for H0: p_ref - p_cand <= delta (larger = more drop)."""
    _check_binomial(x_ref, n_ref, x_cand, n_cand)
    return float(_unpaired_zstar(n_ref, n_cand, _check_delta(delta))[x_ref, x_cand])


def _check_binomial(x1: int, n1: int, x2: int, n2: int) -> None:
    if n1 < 1 or n2 < 1 or not 0 <= x1 <= n1 or not 0 <= x2 <= n2:
        raise GateInputError(f"unpaired counts {x1}/{n1}, {x2}/{n2}: need n >= 1 and 0 <= successes <= n")


def _unpaired_tail(cnt: np.ndarray, n1: int, n2: int, p1: float, p2: float) -> float:
    pmf1 = _binom_pmf(n1, min(max(p1, 0.0), 1.0))
    cdf2 = np.concatenate([[0.0], np.cumsum(_binom_pmf(n2, min(max(p2, 0.0), 1.0)))])
    return float(min(1.0, (pmf1 * cdf2[cnt]).sum()))


def _unpaired_sup_tail(cnt: np.ndarray, n1: int, n2: int, delta: float) -> tuple[float, float]:
    lo, hi = max(0.0, -delta), min(1.0, 1.0 - delta)
    p, x = _sup(lambda x: _unpaired_tail(cnt, n1, n2, x + delta, x), lo, hi)
    return min(p, 1.0), x


def unpaired_pvalue(x_ref: int, n_ref: int, x_cand: int, n_cand: int, delta: float) -> float:
    """Exact unconditional p-value of H0: p_ref - p_cand <= delta for two independent binomials."""
    _check_binomial(x_ref, n_ref, x_cand, n_cand)
    delta = _check_delta(delta)
    zs = _unpaired_zstar(n_ref, n_cand, delta)
    return _unpaired_sup_tail(_row_counts(zs, zs[x_ref, x_cand]), n_ref, n_cand, delta)[0]


def unpaired_critical_value(n_ref: int, n_cand: int, delta: float, alpha: float) -> float:
    delta = _check_delta(delta)
    zs = _unpaired_zstar(n_ref, n_cand, delta)
    vals = np.unique(zs)
    return _critical(vals, lambda u: _unpaired_sup_tail(_row_counts(zs, u), n_ref, n_cand, delta)[0], alpha)


def unpaired_power(
    n_ref: int,
    n_cand: int,
    delta: float,
    alpha: float,
    p_ref: float,
    p_cand: float,
    *,
    crit: float | None = None,
) -> float:
    """Exact power of the unpaired test at true rates (p_ref, p_cand)."""
    delta = _check_delta(delta)
    if crit is None:
        crit = unpaired_critical_value(n_ref, n_cand, delta, alpha)
    if math.isinf(crit):
        return 0.0
    cnt = _row_counts(_unpaired_zstar(n_ref, n_cand, delta), crit)
    return _unpaired_tail(cnt, n_ref, n_cand, p_ref, p_cand)


def _unpaired_mdd(n1: int, n2: int, delta: float, alpha: float, p_ref: float, power: float) -> float | None:
    crit = unpaired_critical_value(n1, n2, delta, alpha)
    if math.isinf(crit) or p_ref <= delta:
        return None
    cnt = _row_counts(_unpaired_zstar(n1, n2, delta), crit)
    if _unpaired_tail(cnt, n1, n2, p_ref, 0.0) < power:
        return None
    return _bisect_increasing(lambda d: _unpaired_tail(cnt, n1, n2, p_ref, p_ref - d) - power, delta, p_ref)


def _unpaired_ci(x1: int, n1: int, x2: int, n2: int, alpha: float) -> tuple[float, float]:
    est = x1 / n1 - x2 / n2
    p1, p2 = x1 / n1, x2 / n2
    se = math.sqrt(max(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2, 1.0 / (n1 + n2)))
    lower = _lower_bound(lambda d: unpaired_pvalue(x1, n1, x2, n2, d), alpha, est, se)
    upper = -_lower_bound(lambda d: unpaired_pvalue(x2, n2, x1, n1, d), alpha, -est, se)
    return lower, upper


# --------------------------------------------------------------------------------------------
# the gate
# --------------------------------------------------------------------------------------------


def _as_outcomes(outcomes: Mapping[Hashable, Any], name: str) -> dict[Hashable, bool]:
    if not isinstance(outcomes, Mapping):
        raise GateInputError(
            f"{name}: expected a mapping episode key -> success (bool), got {type(outcomes).__name__}"
        )
    out: dict[Hashable, bool] = {}
    for k, v in outcomes.items():
        if isinstance(v, (bool, np.bool_)) or (isinstance(v, (int, np.integer)) and v in (0, 1)):
            out[k] = bool(v)
        else:
            raise GateInputError(f"{name}[{k!r}] = {v!r}: success must be a bool (or 0/1)")
    return out


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def gate(
    reference_outcomes: Mapping[Hashable, Any],
    candidate_outcomes: Mapping[Hashable, Any],
    *,
    allowed_drop: float,
    alpha: float = 0.05,
    mode: str = "auto",
    power: float = 0.8,
    confidence_interval: bool = True,
    max_mdd: float | None = None,
) -> GateDecision:
    """Judge a candidate run against a reference run.

    reference_outcomes / candidate_outcomes: mappings episode key -> success; keys are
    (suite, task_id, trial, seed) tuples for LIBERO but any hashable works.
    mode: "paired" (shared keys only), "unpaired" (all episodes of both, independent samples), or
    "auto" (paired when at least half of the candidate's episodes are in the reference).
    max_mdd: if given, a non-rejection whose minimum detectable drop exceeds it (or is undefined)
    is reported as INCONCLUSIVE instead of PASS (the run was too small to tell).
    """
    ref = _as_outcomes(reference_outcomes, "reference_outcomes")
    cand = _as_outcomes(candidate_outcomes, "candidate_outcomes")
    delta = _check_delta(allowed_drop)
    if delta < 0:
        raise GateInputError(f"allowed_drop={delta}: must be >= 0")
    alpha = _check_alpha(alpha)
    if not 0.0 < power < 1.0:
        raise GateInputError(f"power={power}: must be in (0, 1)")
    if mode not in ("auto", "paired", "unpaired"):
        raise GateInputError(f"mode={mode!r}: allowed are 'auto', 'paired', 'unpaired'")
    if not ref:
        raise GateInputError("reference_outcomes is empty: nothing to compare against")
    if not cand:
        raise GateInputError("candidate_outcomes is empty: no episodes to judge")
    shared = [k for k in cand if k in ref]
    if mode == "auto":
        mode = "paired" if len(shared) >= max(1, math.ceil(0.5 * len(cand))) else "unpaired"
    if mode == "paired":
        if not shared:
            raise GateInputError(
                "paired mode: the runs share no episode keys (suite, task_id, trial, seed); "
                "use mode='unpaired' or rerun the reference's episodes"
            )
        d = _gate_paired(ref, cand, shared, delta, alpha, power, confidence_interval)
    else:
        d = _gate_unpaired(ref, cand, delta, alpha, power, confidence_interval)
    if d.verdict == PASS and max_mdd is not None and (d.mdd is None or d.mdd > max_mdd):
        mdd_txt = "no drop" if d.mdd is None else f"only drops >= {_pct(d.mdd)} points"
        d = _replace(
            d,
            verdict=INCONCLUSIVE,
            explanation=f"INCONCLUSIVE: not rejected, but this run detects {mdd_txt} with "
            f"{power:.0%} power (> max_mdd {_pct(max_mdd)} points). " + d.explanation,
        )
    return d


def _replace(d: GateDecision, **kw: Any) -> GateDecision:
    import dataclasses

    return dataclasses.replace(d, **kw)


def _gate_paired(ref, cand, shared, delta, alpha, power, want_ci) -> GateDecision:
    n = len(shared)
    b = sum(1 for k in shared if ref[k] and not cand[k])
    c = sum(1 for k in shared if cand[k] and not ref[k])
    rs = sum(1 for k in shared if ref[k])
    cs = sum(1 for k in shared if cand[k])
    p = paired_pvalue(b, c, n, delta)
    ci = _paired_ci(b, c, n, alpha) if want_ci else None
    mdd = _paired_mdd(n, delta, alpha, c / n, power)
    verdict = REGRESSION if p <= alpha else PASS
    text = _explain(
        verdict,
        "paired exact unconditional test (Tango score, worst case over the nuisance)",
        n,
        rs,
        cs,
        rs,
        cs,
        n,
        n,
        delta,
        alpha,
        p,
        ci,
        mdd,
        power,
        extra=f"{b} reference-only successes, {c} candidate-only successes",
    )
    return GateDecision(
        verdict=verdict,
        mode="paired",
        alpha=alpha,
        allowed_drop=delta,
        p_value=p,
        ci=ci,
        ci_level=(1 - 2 * alpha) if want_ci else None,
        mdd=mdd,
        power=power,
        n=n,
        n_reference=n,
        n_candidate=n,
        reference_successes=rs,
        candidate_successes=cs,
        reference_rate=rs / n,
        candidate_rate=cs / n,
        drop=(b - c) / n,
        b=b,
        c=c,
        ignored_reference=len(ref) - n,
        ignored_candidate=len(cand) - n,
        explanation=text,
    )


def _gate_unpaired(ref, cand, delta, alpha, power, want_ci) -> GateDecision:
    n1, n2 = len(ref), len(cand)
    x1 = sum(ref.values())
    x2 = sum(cand.values())
    p = unpaired_pvalue(x1, n1, x2, n2, delta)
    ci = _unpaired_ci(x1, n1, x2, n2, alpha) if want_ci else None
    mdd = _unpaired_mdd(n1, n2, delta, alpha, x1 / n1, power)
    verdict = REGRESSION if p <= alpha else PASS
    text = _explain(
        verdict,
        "unpaired exact unconditional test (Farrington-Manning score, worst case over the nuisance)",
        n1 + n2,
        x1,
        x2,
        x1,
        x2,
        n1,
        n2,
        delta,
        alpha,
        p,
        ci,
        mdd,
        power,
        extra="independent samples",
    )
    return GateDecision(
        verdict=verdict,
        mode="unpaired",
        alpha=alpha,
        allowed_drop=delta,
        p_value=p,
        ci=ci,
        ci_level=(1 - 2 * alpha) if want_ci else None,
        mdd=mdd,
        power=power,
        n=n1 + n2,
        n_reference=n1,
        n_candidate=n2,
        reference_successes=x1,
        candidate_successes=x2,
        reference_rate=x1 / n1,
        candidate_rate=x2 / n2,
        drop=x1 / n1 - x2 / n2,
        explanation=text,
    )


def _explain(verdict, test, n, rs, cs, _rs, _cs, n1, n2, delta, alpha, p, ci, mdd, power, extra) -> str:
    r1, r2 = rs / n1, cs / n2
    head = (
        f"candidate {cs}/{n2} ({_pct(r2)}%) vs reference {rs}/{n1} ({_pct(r1)}%): observed drop "
        f"{_pct(r1 - r2)} points, allowed {_pct(delta)}"
    )
    ci_txt = ""
    if ci is not None:
        ci_txt = f"; {100 * (1 - 2 * alpha):.0f}% CI of the drop [{_pct(ci[0])}, {_pct(ci[1])}] points"
    mdd_txt = (
        f"; this run detects a drop of {_pct(mdd)} points with {power:.0%} power"
        if mdd is not None
        else f"; this run is too small to detect any drop with {power:.0%} power"
    )
    if verdict == REGRESSION:
        lead = (
            f"REGRESSION: the drop exceeds the allowed {_pct(delta)} points (p = {p:.3g} <= alpha {alpha:g})"
        )
    else:
        lead = (
            f"PASS: no evidence that the drop exceeds {_pct(delta)} points (p = {p:.3g} > alpha = {alpha:g})"
        )
    return f"{lead}. {head}{ci_txt}{mdd_txt}. {test}; {extra}."


# --------------------------------------------------------------------------------------------
# sequential mode (paired)
# --------------------------------------------------------------------------------------------


def spending_function(kind: str, alpha: float, t: float) -> float:
    """Cumulative alpha spent at information fraction t in [0, 1] (Lan-DeMets forms)."""
    t = min(max(float(t), 0.0), 1.0)
    if t <= 0:
        return 0.0
    nd = NormalDist()
    if kind in ("obrien-fleming", "obf"):
        z = nd.inv_cdf(1.0 - alpha / 2.0)
        return min(alpha, 2.0 * (1.0 - nd.cdf(z / math.sqrt(t))))
    if kind == "pocock":
        return alpha * math.log(1.0 + (math.e - 1.0) * t)
    if kind.startswith("power"):  # "power3" = alpha t^3 (Kim-DeMets)
        rho = float(kind[5:] or 3)
        return alpha * t**rho
    raise GateInputError(
        f"spending={kind!r}: allowed are 'obrien-fleming', 'pocock', 'powerR' (e.g. 'power3')"
    )


@dataclass(frozen=True)
class SequentialDesign:
    """Planned looks (cumulative numbers of pairs) and exact critical values of the paired statistic.

    ``regression_bounds[k]``: declare a regression at look k when Z*(b, c; allowed_drop) >= it.
    ``pass_bounds[k]`` (looks before the last): stop with a pass when the reverse statistic
    Z*(c, b; -pass_drop) >= it, i.e. "drop >= pass_drop" is rejected. ``inf`` = no stop possible.
    ``regression_spent[k]``: exact worst-case probability (over the null's nuisance grid) of a false
    regression by look k; never above spending(t_k).
    """

    looks: tuple[int, ...]
    allowed_drop: float
    alpha: float
    spending: str
    regression_bounds: tuple[float, ...]
    regression_spent: tuple[float, ...]
    pass_drop: float | None
    pass_alpha: float | None
    pass_bounds: tuple[float, ...]
    pass_spent: tuple[float, ...]

    @property
    def n_max(self) -> int:
        return self.looks[-1]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _trinomial_grid(m: int, pb: float, pc: float) -> np.ndarray:
    lf = _logfact(m)
    b = np.arange(m + 1)[:, None]
    c = np.arange(m + 1)[None, :]
    a = m - b - c
    ac = np.maximum(a, 0)
    logp = (
        lf[m] - lf[b] - lf[c] - lf[ac] + _klogp(b, pb) + _klogp(c, pc) + _klogp(ac, max(1.0 - pb - pc, 0.0))
    )
    return np.where(a >= 0, np.exp(logp), 0.0)


def _conv2(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    s = (x.shape[0] + k.shape[0] - 1, x.shape[1] + k.shape[1] - 1)
    out = np.fft.irfft2(np.fft.rfft2(x, s) * np.fft.rfft2(k, s), s)
    return np.clip(out, 0.0, None)


def _gs_bounds(
    looks: Sequence[int], n_max: int, delta: float, alpha: float, spending: str, grid: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact alpha-spending critical values of the monotone paired statistic at each look."""
    lo, hi = _paired_nuisance_range(delta)
    xs = _cheb_grid(lo, hi, grid)
    states = [np.ones((1, 1)) for _ in xs]
    cum = np.zeros(len(xs))
    bounds, spent = [], []
    prev = 0
    for nk in looks:
        m = nk - prev
        prev = nk
        states = [_conv2(s, _trinomial_grid(m, x + delta, x)) for s, x in zip(states, xs, strict=True)]
        zs = _paired_zstar(nk, delta)
        b = np.arange(nk + 1)[:, None]
        c = np.arange(nk + 1)[None, :]
        feas = (b + c) <= nk
        zf = zs[feas]
        order = np.argsort(-zf, kind="stable")
        zsorted = zf[order]
        cs = np.stack([np.cumsum(s[feas][order]) for s in states])  # (grid, cells)
        tot = (cum[:, None] + cs).max(axis=0)
        # valid cut positions: last index of each run of equal values
        last_of_tie = np.r_[zsorted[1:] != zsorted[:-1], True]
        target = spending_function(spending, alpha, nk / n_max)
        ok = np.nonzero(last_of_tie & (tot <= target + 1e-15))[0]
        if len(ok) == 0 or not np.isfinite(zsorted[ok[-1]]):
            bounds.append(math.inf)
        else:
            j = int(ok[-1])
            u = float(zsorted[j])
            bounds.append(u)
            cum = cum + cs[:, j]
            rej = zs >= u
            states = [np.where(rej, 0.0, s) for s in states]
        spent.append(float(cum.max()))
    return tuple(bounds), tuple(spent)


def design_sequential(
    n_max: int,
    *,
    allowed_drop: float,
    alpha: float = 0.05,
    looks: int | Sequence[int] = 4,
    spending: str = "obrien-fleming",
    early_pass: bool = True,
    pass_drop: float | None = None,
    pass_alpha: float | None = None,
    grid: int = 33,
) -> SequentialDesign:
    """Group-sequential design for the paired gate with up to n_max pairs.

    looks: number of equally spaced looks, or the cumulative pair counts (increasing, last = n_max).
    early_pass: also stop early with a pass once "drop >= pass_drop" (default: allowed_drop) is
    rejected at the spent level of pass_alpha (default: alpha). Non-binding: ignoring it never
    raises the false-fail rate, which is controlled by the regression bounds alone.
    """
    if int(n_max) < 1:
        raise GateInputError(f"n_max={n_max}: must be >= 1")
    n_max = int(n_max)
    delta = _check_delta(allowed_drop)
    if delta < 0:
        raise GateInputError(f"allowed_drop={delta}: must be >= 0")
    alpha = _check_alpha(alpha)
    spending_function(spending, alpha, 1.0)
    if isinstance(looks, (int, np.integer)):
        if looks < 1:
            raise GateInputError(f"looks={looks}: must be >= 1")
        counts = sorted({max(1, round(n_max * (k + 1) / int(looks))) for k in range(int(looks))})
    else:
        counts = [int(x) for x in looks]
        if (
            not counts
            or any(b <= a for a, b in zip(counts, counts[1:], strict=False))
            or counts[0] < 1
            or counts[-1] != n_max
        ):
            raise GateInputError(
                f"looks={list(looks)}: must be increasing positive pair counts ending at n_max={n_max}"
            )
    reg_b, reg_s = _gs_bounds(counts, n_max, delta, alpha, spending, grid)
    pd = pa = None
    pass_b: tuple[float, ...] = ()
    pass_s: tuple[float, ...] = ()
    if early_pass and len(counts) > 1:
        pd = delta if pass_drop is None else _check_delta(pass_drop, "pass_drop")
        if pd < 0:
            raise GateInputError(f"pass_drop={pd}: must be >= 0")
        pa = alpha if pass_alpha is None else _check_alpha(pass_alpha, "pass_alpha")
        pass_b, pass_s = _gs_bounds(counts[:-1], n_max, -pd, pa, spending, grid)
    return SequentialDesign(tuple(counts), delta, alpha, spending, reg_b, reg_s, pd, pa, pass_b, pass_s)


def sequential_operating_characteristics(
    design: SequentialDesign, drop: float, p_c: float
) -> dict[str, float]:
    """Exact probabilities of the design's outcomes at true drop `drop` and P(ref fail, cand success) = p_c.

    Returns reject (P(regression declared)), early_pass, expected_pairs (E[pairs used]) and
    reject_without_early_pass (the bound that the non-binding design guarantees <= alpha at drop = allowed).
    """
    pb, pc = p_c + drop, p_c
    if pc < 0 or pb < 0 or pb + pc > 1:
        raise GateInputError(f"drop={drop}, p_c={p_c}: need p_c >= 0, p_c + drop >= 0, 2 p_c + drop <= 1")
    state = np.ones((1, 1))
    free = np.ones((1, 1))  # same process with the early-pass stops ignored
    reject = reject_free = early = expected = 0.0
    prev = 0
    for k, nk in enumerate(design.looks):
        kern = _trinomial_grid(nk - prev, pb, pc)
        prev = nk
        state = _conv2(state, kern)
        free = _conv2(free, kern)
        rej = _paired_zstar(nk, design.allowed_drop) >= design.regression_bounds[k]
        r = float(state[rej].sum())
        reject += r
        reject_free += float(free[rej].sum())
        state = np.where(rej, 0.0, state)
        free = np.where(rej, 0.0, free)
        stopped = r
        if k < len(design.pass_bounds) and k < len(design.looks) - 1:
            ps = _paired_zstar(nk, -design.pass_drop).T >= design.pass_bounds[k]
            e = float(state[ps].sum())
            early += e
            stopped += e
            state = np.where(ps, 0.0, state)
        if k == len(design.looks) - 1:
            stopped += float(state.sum())
        expected += nk * stopped
    return {
        "reject": reject,
        "early_pass": early,
        "expected_pairs": expected,
        "reject_without_early_pass": reject_free,
    }


def schedule_order(keys: Sequence[Hashable]) -> list[Hashable]:
    """Default episode order for sequential looks: by trial, then suite, task, seed.

    Runs should execute episodes in this order (all tasks' trial 0, then trial 1, ...) so every
    look covers all tasks; the looks only use a prefix of this order, never "whatever finished first"
    (fast-finishing episodes are more often successes, which would bias the looks).
    """

    def key(k: Hashable) -> tuple:
        if isinstance(k, tuple) and len(k) == 4:
            suite, task, trial, seed = k
            return (0, trial, str(suite), task, seed)
        return (1, repr(k))

    return sorted(keys, key=key)


def sequential_monitor(
    reference_outcomes: Mapping[Hashable, Any],
    candidate_outcomes: Mapping[Hashable, Any],
    *,
    design: SequentialDesign,
    order: Sequence[Hashable] | None = None,
) -> GateDecision:
    """Replay the design's looks on the episodes finished so far and say pass / regression / continue.

    Look k uses exactly the first design.looks[k] keys of `order` (default: schedule_order of the
    reference keys) and is taken only once all of them are in the candidate. Stateless: call it
    after every finished episode; the answer changes only when a look completes.
    """
    ref = _as_outcomes(reference_outcomes, "reference_outcomes")
    cand = _as_outcomes(candidate_outcomes, "candidate_outcomes")
    order = list(schedule_order(list(ref)) if order is None else order)
    missing = [k for k in order[: design.n_max] if k not in ref]
    if missing:
        raise GateInputError(f"order: {len(missing)} keys are not in the reference, e.g. {missing[0]!r}")
    if len(order) < design.n_max:
        raise GateInputError(
            f"sequential design needs {design.n_max} planned episodes, the order has {len(order)}"
        )
    delta = design.allowed_drop
    verdict, look, nk, b, c = CONTINUE, -1, 0, 0, 0
    for k, n_k in enumerate(design.looks):
        keys = order[:n_k]
        if not all(key in cand for key in keys):
            break
        look, nk = k, n_k
        b = sum(1 for key in keys if ref[key] and not cand[key])
        c = sum(1 for key in keys if cand[key] and not ref[key])
        if _paired_zstar(n_k, delta)[b, c] >= design.regression_bounds[k]:
            verdict = REGRESSION
            break
        if k == len(design.looks) - 1:
            verdict = PASS
            break
        if (
            k < len(design.pass_bounds)
            and _paired_zstar(n_k, -design.pass_drop)[c, b] >= design.pass_bounds[k]
        ):
            verdict = PASS
            break
    done = sum(1 for key in order[: design.n_max] if key in cand)
    info = {
        "look": look + 1,
        "looks": list(design.looks),
        "n_max": design.n_max,
        "episodes_done": done,
        "design": design.to_dict(),
    }
    if look < 0:
        rs = cs = 0
        text = (
            f"CONTINUE: the first look needs the first {design.looks[0]} scheduled episodes; "
            f"{done} of them are done."
        )
        return GateDecision(
            CONTINUE,
            "sequential",
            design.alpha,
            delta,
            None,
            None,
            None,
            None,
            0.8,
            0,
            len(ref),
            len(cand),
            0,
            0,
            math.nan,
            math.nan,
            math.nan,
            0,
            0,
            explanation=text,
            sequential=info,
        )
    keys = order[:nk]
    rs = sum(1 for key in keys if ref[key])
    cs = sum(1 for key in keys if cand[key])
    p = paired_pvalue(b, c, nk, delta)
    head = (
        f"look {look + 1}/{len(design.looks)} at {nk} of {design.n_max} pairs: candidate {cs}/{nk} "
        f"({_pct(cs / nk)}%) vs reference {rs}/{nk} ({_pct(rs / nk)}%), drop {_pct((b - c) / nk)} points, "
        f"allowed {_pct(delta)}; b={b}, c={c}; nominal p = {p:.3g}"
    )
    if verdict == REGRESSION:
        text = f"REGRESSION (sequential, overall alpha {design.alpha:g}, {design.spending} spending): {head}."
    elif verdict == PASS and look < len(design.looks) - 1:
        text = (
            f"PASS early: the drop is shown below {_pct(design.pass_drop)} points "
            f"(pass alpha {design.pass_alpha:g}): {head}; {design.n_max - nk} episodes saved."
        )
    elif verdict == PASS:
        text = f"PASS (final look, no evidence of a drop above {_pct(delta)} points): {head}."
    else:
        text = f"CONTINUE: {head}; next look at {design.looks[look + 1]} pairs."
    return GateDecision(
        verdict=verdict,
        mode="sequential",
        alpha=design.alpha,
        allowed_drop=delta,
        p_value=p,
        ci=None,
        ci_level=None,
        mdd=None,
        power=0.8,
        n=nk,
        n_reference=nk,
        n_candidate=nk,
        reference_successes=rs,
        candidate_successes=cs,
        reference_rate=rs / nk,
        candidate_rate=cs / nk,
        drop=(b - c) / nk,
        b=b,
        c=c,
        ignored_reference=len(ref) - nk,
        ignored_candidate=len(cand) - nk,
        explanation=text,
        sequential=info,
    )
