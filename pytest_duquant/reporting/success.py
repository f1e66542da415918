"""Success rate per suite x preset with exact (Clopper-Pearson) intervals and the gate's threshold.

    cells = success_table(records, goldens)          # numbers
    plot_success(cells, "success.png", "success.json")

The threshold drawn for a preset is ``reference rate - allowed drop`` (the golden's FP rate minus the
preset's allowed drop): a bar whose *interval* lies wholly below it is very likely a regression, but the
verdict itself is the gate's paired test (``duquant gate``), which the picture does not replace.
matplotlib is needed only for the PNG (extra ``test``); no pyplot, no global backend change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pytest_duquant.gate import clopper_pearson
from pytest_duquant.golden.episodes import LiberoGolden
from pytest_duquant.results import EpisodeResult, outcomes

__all__ = ["SuccessCell", "plot_success", "success_table", "write_success_report"]


@dataclass(frozen=True)
class SuccessCell:
    suite: str
    preset: str
    successes: int
    episodes: int
    rate: float
    ci_low: float
    ci_high: float
    confidence: float
    reference_rate: float | None = None
    allowed_drop: float | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def success_table(
    records: Iterable[EpisodeResult],
    goldens: Mapping[str, LiberoGolden] | None = None,
    *,
    confidence: float = 0.95,
    allowed_drop: Mapping[str, float] | None = None,
) -> list[SuccessCell]:
    """One cell per (suite, preset) of the records (duplicates of an episode counted once).

    goldens: suite -> golden, for the reference rate and each preset's allowed drop
    (allowed_drop overrides per preset). Presets without an allowed drop get no threshold.
    """
    groups: dict[tuple[str, str], list[EpisodeResult]] = {}
    for r in records:
        groups.setdefault((r.suite, r.preset or "fp"), []).append(r)
    cells = []
    for (suite, preset), recs in sorted(groups.items()):
        out = outcomes(recs)
        n, k = len(out), sum(out.values())
        lo, hi = clopper_pearson(k, n, confidence)
        ref = thr = drop = None
        g = (goldens or {}).get(suite)
        if g is not None:
            ref = g.success_rate
            if allowed_drop and preset in allowed_drop:
                drop = float(allowed_drop[preset])
            elif preset.lower() != "fp":
                drop = next((float(v) for k, v in g.allowed_drop.items() if k.lower() == preset.lower()), None)
            thr = None if drop is None else ref - drop
        cells.append(SuccessCell(suite, preset, k, n, k / n, lo, hi, confidence, ref, drop, thr))
    return cells


def plot_success(
    cells: list[SuccessCell],
    png_path: str | Path,
    json_path: str | Path | None = None,
    *,
    title: str | None = None,
) -> dict[str, Any]:
    """Draw the cells (one point + exact interval per suite x preset, FP reference dashed, thresholds red);
    write the PNG and, if json_path is given, the same numbers as JSON."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suites = sorted({c.suite for c in cells})
    presets = sorted({c.preset for c in cells}, key=lambda p: (p.lower() != "fp", p.lower()))
    width = 0.8 / max(len(presets), 1)
    fig = Figure(figsize=(min(14.0, max(6.5, 3.0 + 0.45 * len(suites) * max(1, len(presets)))), 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#8c8c8c"]
    by = {(c.suite, c.preset): c for c in cells}
    thr_drawn = ref_drawn = False
    for j, p in enumerate(presets):
        xs, ys, lo, hi = [], [], [], []
        for i, s in enumerate(suites):
            c = by.get((s, p))
            if c is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            xs.append(x)
            ys.append(100 * c.rate)
            lo.append(100 * (c.rate - c.ci_low))
            hi.append(100 * (c.ci_high - c.rate))
            if c.threshold is not None:
                ax.hlines(
                    100 * c.threshold,
                    x - width / 2,
                    x + width / 2,
                    colors="#d62728",
                    linewidth=2,
                    label=None if thr_drawn else "gate threshold (reference - allowed drop)",
                )
                thr_drawn = True
        ax.errorbar(
            xs,
            ys,
            yerr=[lo, hi],
            fmt="o",
            color=colors[j % len(colors)],
            label=p,
            capsize=4,
            markersize=6,
            elinewidth=1.5,
        )
    for i, s in enumerate(suites):
        ref = next((c.reference_rate for c in cells if c.suite == s and c.reference_rate is not None), None)
        if ref is not None:
            ax.hlines(
                100 * ref,
                i - 0.45,
                i + 0.45,
                colors="k",
                linestyles="--",
                linewidth=1,
                label=None if ref_drawn else "FP reference (golden)",
            )
            ref_drawn = True
    conf = cells[0].confidence if cells else 0.95
    ax.set_xticks(range(len(suites)))
    ax.set_xticklabels(suites)
    ax.set_ylabel(f"success rate, % ({conf:.0%} Clopper-Pearson)")
    low = min(
        [100 * c.ci_low for c in cells]
        + [100 * c.threshold for c in cells if c.threshold is not None]
        + [100]
    )
    ax.set_ylim(max(0.0, low - 5), 101)
    ax.set_title(title or "LIBERO success rate per suite and preset")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight")
    data = {
        "confidence": conf,
        "suites": suites,
        "presets": presets,
        "cells": [c.to_dict() for c in cells],
        "png": str(png),
    }
    if json_path is not None:
        jp = Path(json_path)
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return data


def write_success_report(
    records: Iterable[EpisodeResult], goldens: Mapping[str, LiberoGolden] | None, out_dir: str | Path
) -> dict[str, Path] | None:
    """``success.png`` + ``success.json`` of the given records (and goldens) in out_dir; None without records."""
    records = list(records)
    if not records:
        return None
    out = Path(out_dir)
    plot_success(success_table(records, goldens), out / "success.png", out / "success.json")
    return {"png": out / "success.png", "json": out / "success.json"}
