"""A Judgement drawn as a table (one row per suite) for the terminal; the numbers are the judge's."""

from __future__ import annotations

import math

from pytest_duquant.judge import Judgement

HEAD = ("suite", "mode", "n", "ref %", "cand %", "drop", "interval of drop", "allowed", "MDD80", "verdict")


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table(judgement: Judgement) -> str:
    rows = []
    for s in judgement.suites:
        d = s.decision
        if d is None:
            rows.append([s.suite, "-", "-", "-", "-", "-", "-", "-", "-", s.outcome.upper()])
            continue
        ci = "-" if d.ci is None else f"[{_pct(d.ci[0])}, {_pct(d.ci[1])}]"
        rows.append([s.suite, d.mode, str(d.n), _pct(d.reference_rate), _pct(d.candidate_rate), _pct(d.drop), ci,
                     _pct(d.allowed_drop), _pct(d.mdd), s.outcome.upper()])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEAD)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*HEAD), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def render(judgement: Judgement) -> str:
    """Header, table, each suite's explanation and notes, the verdict line."""
    body = judgement.text().splitlines()
    return "\n".join([body[0], "", table(judgement), "", *body[1:]])
