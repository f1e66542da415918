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

    ``drop``/``ci``/``mdd``/``allowed_drop`` are in success-rate units (0.05 = 5 points). ``ci`` = (L, U):
    L is the exact one-sided (1 - alpha) lower bound of the true drop, U the one-sided (1 - pass_alpha)
    upper bound, both monotone (see _lower_bound). The verdict is read off them: REGRESSION when
    L > allowed_drop, PASS when U < allowed_drop, INCONCLUSIVE otherwise (then ``extra_pairs`` estimates
    how many more paired episodes would likely decide it). ``p_value``/``p_pass`` are the nominal exact
    p-values of "drop <= allowed" and "drop >= allowed" at this allowed drop: not monotone in it (their
    rejection regions are discrete), so the verdict follows the interval, not them.
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
    explanation: str = ""
    sequential: dict[str, Any] | None = field(default=None)
    pass_alpha: float | None = None
    p_pass: float | None = None
    extra_pairs: int | None = None

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


WINDOW = 24  # grid points below a bound checked for a non-rejection


def grid_step(n: int) -> float:
    """The resolution of the monotone bounds: 1/40 of the largest standard error of a rate at n, >= 5e-4;
    WINDOW steps cover 0.6 of it, where the exact p-value crosses alpha."""
    return max(0.5 / math.sqrt(max(n, 1)) / 40.0, 5e-4)


def _lower_bound(
    pfun: Callable[[float], float], alpha: float, est: float, se: float, step: float, tol: float = 2e-4
) -> float:
    """The exact one-sided (1 - alpha) lower confidence bound of the drop, made monotone:
    L = inf{d : pfun(d) > alpha}, so that every d below L is rejected.

    Then "L > delta" implies "the test at delta rejects" for *every* delta (a valid bound, and a verdict
    read off L is monotone in delta), although the exact p-value is not monotone in d (its rejection
    region is discrete). Found by bisection, then checked downwards on WINDOW grid points of `step`
    (grid_step(n)); a non-rejected grid point lowers L below it and the search repeats.
    """
    eps = 1e-6
    lo = max(-1.0 + eps, est - 4.0 * se - 0.01)
    if pfun(lo) > alpha:
        lo = -1.0 + eps
        if pfun(lo) > alpha:
            return -1.0
    hi = min(1.0 - eps, est + 0.5 * se)
    if pfun(hi) <= alpha:
        hi = 1.0 - eps
        if pfun(hi) <= alpha:
            return 1.0
    while True:
        while hi - lo > tol:  # pfun(lo) <= alpha < pfun(hi)
            mid = 0.5 * (lo + hi)
            if pfun(mid) <= alpha:
                lo = mid
            else:
                hi = mid
        bad = next((d for d in (lo - k * step for k in range(1, WINDOW + 1)) if d > -1.0 and pfun(d) > alpha), None)
        if bad is None:
            return lo
        hi, lo = bad, bad - step
        while lo > -1.0 + eps and pfun(lo) > alpha:
            hi, lo = lo, lo - step
        if lo <= -1.0 + eps:
            return -1.0


def _paired_se(b: int, c: int, n: int) -> float:
    est = (b - c) / n
    return math.sqrt(max((b + c) / n - est * est, 1.0 / n) / n)


def _paired_ci(b: int, c: int, n: int, alpha: float, pass_alpha: float | None = None) -> tuple[float, float]:
    """(L, U): the monotone one-sided bounds of the drop at alpha (lower) and pass_alpha (upper, default alpha)."""
    est, se, step = (b - c) / n, _paired_se(b, c, n), grid_step(n)
    lower = _lower_bound(lambda d: paired_pvalue(b, c, n, d), alpha, est, se, step)
    upper = -_lower_bound(lambda d: paired_pvalue(c, b, n, d), pass_alpha or alpha, -est, se, step)
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


def _unpaired_se(x1: int, n1: int, x2: int, n2: int) -> float:
    p1, p2 = x1 / n1, x2 / n2
    return math.sqrt(max(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2, 1.0 / (n1 + n2)))


def _unpaired_ci(
    x1: int, n1: int, x2: int, n2: int, alpha: float, pass_alpha: float | None = None
) -> tuple[float, float]:
    """(L, U) as _paired_ci, for two independent samples."""
    est, se, step = x1 / n1 - x2 / n2, _unpaired_se(x1, n1, x2, n2), grid_step(n1 + n2)
    lower = _lower_bound(lambda d: unpaired_pvalue(x1, n1, x2, n2, d), alpha, est, se, step)
    upper = -_lower_bound(lambda d: unpaired_pvalue(x2, n2, x1, n1, d), pass_alpha or alpha, -est, se, step)
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


def verdict_of(ci: tuple[float, float], delta: float) -> str:
    """The three-way verdict read off the interval: REGRESSION if L > delta, PASS if U < delta."""
    if ci[0] > delta:
        return REGRESSION
    if ci[1] < delta:
        return PASS
    return INCONCLUSIVE


def extra_pairs_needed(
    b: int, c: int, n: int, delta: float, alpha: float, power: float = 0.8, paired: bool = True
) -> int:
    """About how many more paired episodes would decide an inconclusive run with probability `power` if the
    observed discordance rates hold (normal approximation; rates shrunk by +1/2 so 0/0 is not certainty)."""
    pb, pc = (b + 0.5) / (n + 1), (c + 0.5) / (n + 1)
    var = pb + pc - (pb - pc) ** 2 if paired else pb * (1 - pb) + pc * (1 - pc)
    gap = abs((b - c) / n - delta)
    nd = NormalDist()
    z = nd.inv_cdf(1 - alpha) + nd.inv_cdf(power)
    need = math.ceil((z * math.sqrt(var) / max(gap, 1e-3)) ** 2)
    return max(1, need - n)


def gate(
    reference_outcomes: Mapping[Hashable, Any],
    candidate_outcomes: Mapping[Hashable, Any],
    *,
    allowed_drop: float,
    alpha: float = 0.05,
    pass_alpha: float | None = None,
    mode: str = "paired",
    power: float = 0.8,
    max_mdd: float | None = None,
) -> GateDecision:
    """Judge a candidate run against a reference run: PASS, REGRESSION or INCONCLUSIVE.

    reference_outcomes / candidate_outcomes: mappings episode key -> success; keys are
    (suite, task_id, trial, seed) tuples for LIBERO but any hashable works.
    mode: "paired" (both runs hold exactly the same episodes; anything else is a GateInputError: an
    incomplete run is never judged) or "unpaired" (independent samples).
    alpha: level of the regression side (the lower bound); pass_alpha (default alpha): of the pass side.
    max_mdd: a PASS whose minimum detectable drop (at `power`) exceeds it is reported INCONCLUSIVE.
    """
    ref = _as_outcomes(reference_outcomes, "reference_outcomes")
    cand = _as_outcomes(candidate_outcomes, "candidate_outcomes")
    delta = _check_delta(allowed_drop)
    if delta < 0:
        raise GateInputError(f"allowed_drop={delta}: must be >= 0")
    alpha = _check_alpha(alpha)
    pass_alpha = alpha if pass_alpha is None else _check_alpha(pass_alpha, "pass_alpha")
    if not 0.0 < power < 1.0:
        raise GateInputError(f"power={power}: must be in (0, 1)")
    if mode not in ("paired", "unpaired"):
        raise GateInputError(f"mode={mode!r}: allowed are 'paired', 'unpaired'")
    if not ref:
        raise GateInputError("reference_outcomes is empty: nothing to compare against")
    if not cand:
        raise GateInputError("candidate_outcomes is empty: no episodes to judge")
    if mode == "paired":
        missing = [k for k in ref if k not in cand]
        extra = [k for k in cand if k not in ref]
        if missing or extra:
            raise GateInputError(
                f"paired mode needs the same episodes in both runs: {len(missing)} reference episode(s) "
                f"missing from the candidate{f' (e.g. {missing[0]!r})' if missing else ''}, {len(extra)} "
                f"candidate episode(s) not in the reference{f' (e.g. {extra[0]!r})' if extra else ''}"
            )
        keys = list(ref)
        n = len(keys)
        b = sum(1 for k in keys if ref[k] and not cand[k])
        c = sum(1 for k in keys if cand[k] and not ref[k])
        rs, cs = sum(ref.values()), sum(cand.values())
        ci = _paired_ci(b, c, n, alpha, pass_alpha)
        p, p_pass = paired_pvalue(b, c, n, delta), paired_pvalue(c, b, n, -delta)
        mdd = _paired_mdd(n, delta, alpha, c / n, power)
        counts = {"n": n, "n_reference": n, "n_candidate": n, "b": b, "c": c}
        test = "paired exact unconditional test (Tango score, worst case over the nuisance)"
        extra_txt = f"{b} reference-only successes, {c} candidate-only successes"
    else:
        n1, n2 = len(ref), len(cand)
        rs, cs = sum(ref.values()), sum(cand.values())
        ci = _unpaired_ci(rs, n1, cs, n2, alpha, pass_alpha)
        p, p_pass = unpaired_pvalue(rs, n1, cs, n2, delta), unpaired_pvalue(cs, n2, rs, n1, -delta)
        mdd = _unpaired_mdd(n1, n2, delta, alpha, rs / n1, power)
        b = c = None
        counts = {"n": n1 + n2, "n_reference": n1, "n_candidate": n2}
        test = "unpaired exact unconditional test (Farrington-Manning score, worst case over the nuisance)"
        extra_txt = "independent samples"
    return _decision(
        mode,
        delta,
        alpha,
        pass_alpha,
        ci,
        p,
        p_pass,
        mdd,
        power,
        max_mdd,
        rs,
        cs,
        counts,
        f"{test}; {extra_txt}",
    )


def _decision(
    mode, delta, alpha, pass_alpha, ci, p, p_pass, mdd, power, max_mdd, rs, cs, counts, method
) -> GateDecision:
    """The one place a fixed-sample GateDecision is assembled (verdict from the interval, explanation)."""
    n1, n2 = counts["n_reference"], counts["n_candidate"]
    verdict = verdict_of(ci, delta)
    b, c = counts.get("b"), counts.get("c")
    extra_pairs = None
    head = (
        f"candidate {cs}/{n2} ({_pct(cs / n2)}%) vs reference {rs}/{n1} ({_pct(rs / n1)}%): observed drop "
        f"{_pct(rs / n1 - cs / n2)} points, allowed {_pct(delta)}; exact interval of the drop "
        f"[{_pct(ci[0])}, {_pct(ci[1])}] points (lower bound one-sided {1 - alpha:.0%}, upper "
        f"{1 - pass_alpha:.0%})"
    )
    mdd_txt = (
        f"this run detects a drop of {_pct(mdd)} points with {power:.0%} power"
        if mdd is not None
        else f"this run is too small to detect any drop with {power:.0%} power"
    )
    if verdict == REGRESSION:
        lead = f"REGRESSION: the drop is shown above the allowed {_pct(delta)} points (lower bound {_pct(ci[0])})"
    elif verdict == PASS and max_mdd is not None and (mdd is None or mdd > max_mdd):
        verdict = INCONCLUSIVE
        lead = (
            f"INCONCLUSIVE: the drop is shown below {_pct(delta)} points, but {mdd_txt}, more than "
            f"--max-mdd {_pct(max_mdd)}"
        )
    elif verdict == PASS:
        lead = f"PASS: the drop is shown below the allowed {_pct(delta)} points (upper bound {_pct(ci[1])})"
    else:
        if b is not None:
            extra_pairs = extra_pairs_needed(b, c, counts["n"], delta, min(alpha, pass_alpha), power)
        else:
            nn = min(n1, n2)
            extra_pairs = extra_pairs_needed(
                round((1 - cs / n2) * nn), round((1 - rs / n1) * nn), nn, delta, min(alpha, pass_alpha), power, False
            )
        lead = (
            f"INCONCLUSIVE: the interval contains the allowed drop of {_pct(delta)} points; about "
            f"{extra_pairs} more {'paired ' if b is not None else ''}episodes would likely decide it "
            f"({power:.0%} power if the observed rates hold)"
        )
    return GateDecision(
        verdict=verdict,
        mode=mode,
        alpha=alpha,
        allowed_drop=delta,
        p_value=p,
        ci=ci,
        ci_level=1 - alpha - pass_alpha,
        mdd=mdd,
        power=power,
        n=counts["n"],
        n_reference=n1,
        n_candidate=n2,
        reference_successes=rs,
        candidate_successes=cs,
        reference_rate=rs / n1,
        candidate_rate=cs / n2,
        drop=rs / n1 - cs / n2,
        b=b,
        c=c,
        explanation=f"{lead}. {head}; {mdd_txt}. {method}.",
        pass_alpha=pass_alpha,
        p_pass=p_pass,
        extra_pairs=extra_pairs,
    )


def verdict_table(n: int, delta: float, alpha: float, pass_alpha: float | None = None) -> np.ndarray:
    """The paired verdict for every (b, c) among n pairs at once: int8 array [b, c] with 1 = REGRESSION,
    0 = PASS, -1 = INCONCLUSIVE, -2 = infeasible (b + c > n). For simulations: the same rule as gate(), on
    same grid (REGRESSION when every allowed drop delta - k * grid_step(n), k = 0..WINDOW, is rejected; PASS
    likewise upwards with the reverse test). gate() bisects between grid points too, so the two agree
    except where the p-value crosses alpha twice within one grid step."""
    delta = _check_delta(delta)
    alpha = _check_alpha(alpha)
    pass_alpha = alpha if pass_alpha is None else _check_alpha(pass_alpha, "pass_alpha")
    step = grid_step(n)
    b = np.arange(n + 1)[:, None]
    c = np.arange(n + 1)[None, :]
    feasible = (b + c) <= n
    reg = np.ones((n + 1, n + 1), dtype=bool)
    for k in range(WINDOW + 1):
        d = delta - k * step
        if d <= -1.0:
            break
        crit = paired_critical_value(n, d, alpha)
        reg &= _paired_zstar(n, d) >= crit
    ok = np.ones((n + 1, n + 1), dtype=bool)
    for k in range(WINDOW + 1):
        d = delta + k * step
        if d >= 1.0:
            break
        crit = paired_critical_value(n, -d, pass_alpha)
        ok &= _paired_zstar(n, -d).T >= crit  # the reverse test: roles of b and c swapped
    out = np.full((n + 1, n + 1), -1, dtype=np.int8)
    out[reg] = 1
    out[ok & ~reg] = 0
    out[~feasible] = -2
    return out


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
    ``pass_bounds[k]`` (every look, the last included): declare a pass when the reverse statistic
    Z*(c, b; -pass_drop) >= it, i.e. "drop >= pass_drop" is rejected. ``inf`` = no stop possible.
    At the last look neither = INCONCLUSIVE. ``*_spent[k]``: exact worst-case probability (over the
    null's nuisance grid) of a false regression / false pass by look k; never above spending(t_k).
    """

    looks: tuple[int, ...]
    allowed_drop: float
    alpha: float
    spending: str
    regression_bounds: tuple[float, ...]
    regression_spent: tuple[float, ...]
    pass_drop: float
    pass_alpha: float
    pass_bounds: tuple[float, ...]
    pass_spent: tuple[float, ...]

    @property
    def n_max(self) -> int:
        return self.looks[-1]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SequentialDesign:
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


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


def _window(n: int, p: float) -> tuple[int, int]:
    """Counts of a Binomial(n, p) margin outside [lo, hi] carry less than 1e-18 of the mass."""
    sd = math.sqrt(n * p * (1 - p))
    return max(0, int(n * p - _WINDOW_SD * sd - 4)), min(n, int(math.ceil(n * p + _WINDOW_SD * sd + 4)))


def _trinomial_window(m: int, pb: float, pc: float) -> tuple[int, int, np.ndarray]:
    """P(B = b0 + i, C = c0 + j) of m trinomial pairs on the window where the mass is."""
    b0, b1 = _window(m, pb)
    c0, c1 = _window(m, pc)
    lf = _logfact(m)
    b = np.arange(b0, b1 + 1)[:, None]
    c = np.arange(c0, c1 + 1)[None, :]
    a = m - b - c
    ac = np.maximum(a, 0)
    logp = lf[m] - lf[b] - lf[c] - lf[ac] + _klogp(b, pb) + _klogp(c, pc) + _klogp(ac, max(1.0 - pb - pc, 0.0))
    return b0, c0, np.where(a >= 0, np.exp(logp), 0.0)


def _advance(state: tuple[int, int, np.ndarray], m: int, n: int, pb: float, pc: float):
    """The not-yet-stopped mass after m more pairs (n in all), cropped to the window of n pairs."""
    b0, c0, arr = state
    kb, kc, kern = _trinomial_window(m, pb, pc)
    out = _conv2(arr, kern)
    nb0, nc0 = b0 + kb, c0 + kc
    wb0, wb1 = _window(n, pb)
    wc0, wc1 = _window(n, pc)
    lo_b, hi_b = max(nb0, wb0), min(nb0 + out.shape[0] - 1, wb1, n)
    lo_c, hi_c = max(nc0, wc0), min(nc0 + out.shape[1] - 1, wc1, n)
    return lo_b, lo_c, out[lo_b - nb0 : hi_b - nb0 + 1, lo_c - nc0 : hi_c - nc0 + 1]


def _gs_bounds(
    looks: Sequence[int], n_max: int, delta: float, alpha: float, spending: str, grid: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact alpha-spending critical values of the monotone paired statistic at each look.

    A dynamic program carries, for each nuisance value on a Chebyshev grid of the boundary
    p_b = p_c + delta, the exact distribution of (b, c) over paths not yet stopped, on the window where
    its mass lies (FFT convolution of trinomial increments): O(window) instead of O(n^2) per look.
    """
    lo, hi = _paired_nuisance_range(delta)
    xs = [float(x) for x in _cheb_grid(lo, hi, grid)]
    states = [(0, 0, np.ones((1, 1))) for _ in xs]
    cum = np.zeros(len(xs))
    bounds, spent = [], []
    prev = 0
    for nk in looks:
        states = [_advance(st, nk - prev, nk, x + delta, x) for st, x in zip(states, xs, strict=True)]
        prev = nk
        zs = _paired_zstar(nk, delta)
        cells = [zs[b0 : b0 + a.shape[0], c0 : c0 + a.shape[1]] for b0, c0, a in states]
        values = np.unique(np.concatenate([z[np.isfinite(z)].ravel() for z in cells]))[::-1]  # descending
        tot = np.zeros(len(values))
        for z, (_, _, a), cx in zip(cells, states, cum, strict=True):
            order = np.argsort(-z, axis=None, kind="stable")
            zsorted = z.ravel()[order]
            mass = np.cumsum(a.ravel()[order])
            # mass of cells with Z* >= v, for each candidate v (descending): the prefix up to the last z >= v
            idx = np.searchsorted(-zsorted, -values, side="right")
            tot = np.maximum(tot, cx + np.where(idx > 0, mass[np.maximum(idx - 1, 0)], 0.0))
        target = spending_function(spending, alpha, nk / n_max)
        ok = np.nonzero(tot <= target + 1e-15)[0]
        if len(ok) == 0:
            bounds.append(math.inf)
        else:
            u = float(values[ok[-1]])
            bounds.append(u)
            new_states = []
            for (b0, c0, a), z, j in zip(states, cells, range(len(xs)), strict=True):
                rej = z >= u
                cum[j] += float(a[rej].sum())
                new_states.append((b0, c0, np.where(rej, 0.0, a)))
            states = new_states
        spent.append(float(cum.max()))
    return tuple(bounds), tuple(spent)


def _look_counts(n_max: int, looks: int | Sequence[int], min_first: int) -> list[int]:
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
    early = [k for k in counts if k < min_first]
    if not early:
        return counts
    return [k for k in counts if k >= min_first] or [n_max]


def design_sequential(
    n_max: int,
    *,
    allowed_drop: float,
    alpha: float = 0.05,
    looks: int | Sequence[int] = 4,
    spending: str = "obrien-fleming",
    pass_drop: float | None = None,
    pass_alpha: float | None = None,
    min_first: int = 1,
    grid: int = 33,
) -> SequentialDesign:
    """Group-sequential design for the paired gate with up to n_max pairs (memoized per arguments).

    looks: number of equally spaced looks, or the cumulative pair counts (increasing, last = n_max); looks
    before `min_first` pairs (the smallest number of episodes worth judging) are dropped. Both verdicts
    spend their level over the looks: a regression when "drop <= allowed_drop" is rejected (alpha), a pass
    when "drop >= pass_drop" (default allowed_drop) is rejected (pass_alpha, default alpha). Each side is
    non-binding for the other: stopping on one can only lower the other's error rate.
    """
    if int(n_max) < 1:
        raise GateInputError(f"n_max={n_max}: must be >= 1")
    delta = _check_delta(allowed_drop)
    if delta < 0:
        raise GateInputError(f"allowed_drop={delta}: must be >= 0")
    alpha = _check_alpha(alpha)
    spending_function(spending, alpha, 1.0)
    counts = tuple(_look_counts(int(n_max), looks, int(min_first)))
    pd = delta if pass_drop is None else _check_delta(pass_drop, "pass_drop")
    if pd < 0:
        raise GateInputError(f"pass_drop={pd}: must be >= 0")
    pa = alpha if pass_alpha is None else _check_alpha(pass_alpha, "pass_alpha")
    return _design(int(n_max), counts, delta, alpha, spending, pd, pa, int(grid))


@functools.lru_cache(maxsize=32)
def _design(n_max, counts, delta, alpha, spending, pd, pa, grid) -> SequentialDesign:
    reg_b, reg_s = _gs_bounds(counts, n_max, delta, alpha, spending, grid)
    pass_b, pass_s = _gs_bounds(counts, n_max, -pd, pa, spending, grid)
    return SequentialDesign(counts, delta, alpha, spending, reg_b, reg_s, pd, pa, pass_b, pass_s)


def sequential_operating_characteristics(
    design: SequentialDesign, drop: float, p_c: float
) -> dict[str, float]:
    """Exact probabilities of the design's outcomes at true drop `drop` and P(ref fail, cand success) = p_c.

    Returns regression, pass (early or final), inconclusive (final look, neither), expected_pairs
    (E[pairs used]) and regression_without_pass_stops (the bound the regression side guarantees <= alpha
    at drop = allowed).
    """
    pb, pc = p_c + drop, p_c
    if pc < 0 or pb < 0 or pb + pc > 1:
        raise GateInputError(f"drop={drop}, p_c={p_c}: need p_c >= 0, p_c + drop >= 0, 2 p_c + drop <= 1")
    state = (0, 0, np.ones((1, 1)))
    free = (0, 0, np.ones((1, 1)))  # the same process with the pass stops ignored
    reject = reject_free = passed = expected = 0.0
    prev = 0
    for k, nk in enumerate(design.looks):
        state = _advance(state, nk - prev, nk, pb, pc)
        free = _advance(free, nk - prev, nk, pb, pc)
        prev = nk
        zs = _paired_zstar(nk, design.allowed_drop)
        zp = _paired_zstar(nk, -design.pass_drop).T
        b0, c0, a = state
        rej = zs[b0 : b0 + a.shape[0], c0 : c0 + a.shape[1]] >= design.regression_bounds[k]
        r = float(a[rej].sum())
        a = np.where(rej, 0.0, a)
        ok = zp[b0 : b0 + a.shape[0], c0 : c0 + a.shape[1]] >= design.pass_bounds[k]
        e = float(a[ok].sum())
        a = np.where(ok, 0.0, a)
        state = (b0, c0, a)
        fb0, fc0, fa = free
        frej = zs[fb0 : fb0 + fa.shape[0], fc0 : fc0 + fa.shape[1]] >= design.regression_bounds[k]
        reject_free += float(fa[frej].sum())
        free = (fb0, fc0, np.where(frej, 0.0, fa))
        reject += r
        passed += e
        stopped = r + e + (float(a.sum()) if k == len(design.looks) - 1 else 0.0)
        expected += nk * stopped
    return {
        "regression": reject,
        "pass": passed,
        "inconclusive": max(0.0, 1.0 - reject - passed),
        "expected_pairs": expected,
        "regression_without_pass_stops": reject_free,
    }


def _powered(n: int, delta: float, alpha: float, p_c: float, power: float, max_mdd: float | None) -> bool:
    """No max_mdd, or this many pairs detect a drop of max_mdd with `power`."""
    if max_mdd is None:
        return True
    mdd = _paired_mdd(n, delta, alpha, p_c, power)
    return mdd is not None and mdd <= max_mdd


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
    in_flight: int = 8,
    max_mdd: float | None = None,
    power: float = 0.8,
) -> GateDecision:
    """Replay the design's looks on the episodes finished so far: PASS, REGRESSION, CONTINUE, or (after the
    last look) INCONCLUSIVE.

    Look k uses exactly the first design.looks[k] keys of `order` (default: schedule_order of the
    reference keys) and is taken only once all of them are in the candidate. Stateless: call it after
    every finished episode. Unusable (GateInputError), never "continue": a candidate episode that is not in
    the reference (another seed, suite or trial set), or a scheduled episode still absent while more than
    `in_flight` episodes after it are done (it was skipped: rerun it). max_mdd: a pass is taken only when
    the minimum detectable drop at that look (`power`) is at most max_mdd.
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
    stray = [k for k in cand if k not in ref]
    if stray:
        raise GateInputError(
            f"{len(stray)} candidate episode(s) are not episodes of the reference, e.g. {stray[0]!r} "
            "(another seed, suite or trial set): the run does not pair with the golden"
        )
    plan = order[: design.n_max]
    done_at = [i for i, k in enumerate(plan) if k in cand]
    for i, k in enumerate(plan):
        if k in cand:
            continue
        later = sum(1 for j in done_at if j > i)
        if later > in_flight:
            raise GateInputError(
                f"scheduled episode {k!r} is missing while {later} episodes after it are done (more than "
                f"{in_flight} in flight): the run skipped it; rerun it (results resume)"
            )
        break
    delta = design.allowed_drop
    verdict, look = CONTINUE, -1
    for k, n_k in enumerate(design.looks):
        keys = plan[:n_k]
        if not all(key in cand for key in keys):
            break
        look = k
        b = sum(1 for key in keys if ref[key] and not cand[key])
        c = sum(1 for key in keys if cand[key] and not ref[key])
        if _paired_zstar(n_k, delta)[b, c] >= design.regression_bounds[k]:
            verdict = REGRESSION
            break
        if _paired_zstar(n_k, -design.pass_drop)[c, b] >= design.pass_bounds[k] and _powered(
            n_k, delta, design.alpha, c / n_k, power, max_mdd
        ):
            verdict = PASS
            break
        if k == len(design.looks) - 1:
            verdict = INCONCLUSIVE
    done = len(done_at)
    info = {
        "look": look + 1,
        "looks": list(design.looks),
        "n_max": design.n_max,
        "episodes_done": done,
        "design": design.to_dict(),
    }
    nk = design.looks[look] if look >= 0 else 0
    keys = plan[:nk]
    rs = sum(1 for key in keys if ref[key])
    cs = sum(1 for key in keys if cand[key])
    b = sum(1 for key in keys if ref[key] and not cand[key])
    c = sum(1 for key in keys if cand[key] and not ref[key])
    if look < 0:
        text = (
            f"CONTINUE: the first look needs the first {design.looks[0]} scheduled episodes; "
            f"{sum(1 for key in plan[: design.looks[0]] if key in cand)} of them are done."
        )
        p = None
    else:
        p = paired_pvalue(b, c, nk, delta)
        head = (
            f"look {look + 1}/{len(design.looks)} at {nk} of {design.n_max} pairs: candidate {cs}/{nk} "
            f"({_pct(cs / nk)}%) vs reference {rs}/{nk} ({_pct(rs / nk)}%), drop {_pct((b - c) / nk)} points, "
            f"allowed {_pct(delta)}; b={b}, c={c}; nominal p = {p:.3g}"
        )
        if verdict == REGRESSION:
            text = f"REGRESSION (sequential, overall alpha {design.alpha:g}, {design.spending} spending): {head}."
        elif verdict == PASS:
            saved = f"; {design.n_max - nk} episodes saved" if nk < design.n_max else ""
            text = (
                f"PASS: the drop is shown below {_pct(design.pass_drop)} points "
                f"(sequential, pass alpha {design.pass_alpha:g}): {head}{saved}."
            )
        elif verdict == INCONCLUSIVE:
            text = (
                f"INCONCLUSIVE: the last look decided neither way: {head}; about "
                f"{extra_pairs_needed(b, c, nk, delta, design.alpha, power)} more paired episodes would "
                "likely decide it (a larger golden)."
            )
        else:
            text = f"CONTINUE: {head}; next look at {design.looks[look + 1]} pairs."
    n = max(nk, 1)
    return GateDecision(
        verdict=verdict,
        mode="sequential",
        alpha=design.alpha,
        allowed_drop=delta,
        p_value=p,
        ci=None,
        ci_level=None,
        mdd=None,
        power=power,
        n=nk,
        n_reference=nk,
        n_candidate=nk,
        reference_successes=rs,
        candidate_successes=cs,
        reference_rate=rs / n if nk else math.nan,
        candidate_rate=cs / n if nk else math.nan,
        drop=(b - c) / n if nk else math.nan,
        b=b,
        c=c,
        explanation=text,
        sequential=info,
        pass_alpha=design.pass_alpha,
    )
