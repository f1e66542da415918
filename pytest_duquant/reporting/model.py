"""Model report: per-layer SQNR (DuQuant vs plain RTN, by layer index and projection type) and output error
per preset, as a PNG (matplotlib, Agg, no pyplot) and a JSON of the same numbers.

    metrics = collect_metrics(probe, preset_configs(["A", "B"]))           # metrics.probe; or the suites' own
    write_model_report(metrics, "report/")                                  # model.png + model.json

Drawing only: the measuring is metrics.probe's (collect_metrics), the loading the callers'.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pytest_duquant.metrics.records import ModelMetrics

KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")
KIND_MARKERS = {
    "q_proj": "o",
    "k_proj": "v",
    "v_proj": "^",
    "o_proj": "s",
    "gate_proj": "D",
    "up_proj": "P",
    "down_proj": "X",
    "fc1": "P",
    "fc2": "X",
}


def label_of(m: ModelMetrics) -> str:
    rot = m.settings.get("rotation", "svd")
    return m.preset if rot == "svd" or m.preset.endswith(rot) else f"{m.preset}-{rot}"


# ---- JSON ------------------------------------------------------------------------------------------
def report_data(metrics: Iterable[ModelMetrics]) -> dict[str, Any]:
    """The numbers of the figure, grouped by model."""
    models: dict[str, Any] = {}
    for m in metrics:
        entry = models.setdefault(m.model, {"fingerprint": m.fingerprint, "variants": []})
        entry["variants"].append(
            {
                "label": label_of(m),
                "preset": m.preset,
                "settings": m.settings,
                "output": vars(m.output),
                "output_rtn": None if m.output_rtn is None else vars(m.output_rtn),
                "mean_sqnr_db": m.mean_sqnr_db,
                "mean_rtn_sqnr_db": m.mean_rtn_sqnr_db,
                "layers_better_than_rtn": sum(1 for la in m.layers if (la.gain_db or 0.0) > 0.0),
                "bytes_before": m.bytes_before,
                "bytes_after": m.bytes_after,
                "info": m.info,
                "layers": [
                    {
                        "name": la.name,
                        "index": la.index,
                        "kind": la.kind,
                        "shape": la.shape,
                        "wbits": la.wbits,
                        "sqnr_db": la.sqnr_db,
                        "rtn_sqnr_db": la.rtn_sqnr_db,
                    }
                    for la in m.layers
                ],
            }
        )
    return {"schema": "pytest-duquant/model-report", "schema_version": 1, "models": models}


def markdown_table(metrics: Iterable[ModelMetrics]) -> str:
    """One row per measured variant: output error, mean SQNR, DuQuant vs RTN."""
    rows = [
        "| model | variant | W/A | output rel L2 | output max abs | RTN rel L2 | mean SQNR dB | "
        "RTN SQNR dB | "
        "gain dB | layers > RTN | MiB before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in metrics:
        rtn = "-" if m.output_rtn is None else f"{m.output_rtn.rel_l2:.4f}"
        msr = m.mean_rtn_sqnr_db
        gain = "-" if msr is None else f"{m.mean_sqnr_db - msr:+.2f}"
        better = sum(1 for la in m.layers if (la.gain_db or 0.0) > 0.0)
        rows.append(
            f"| {m.model} | {label_of(m)} | W{m.settings['wbits_default']}A{m.settings['abits']} | "
            f"{m.output.rel_l2:.4f} | {m.output.max_abs:.4f} | {rtn} | {m.mean_sqnr_db:.2f} | "
            f"{'-' if msr is None else f'{msr:.2f}'} | {gain} | {better}/{len(m.layers)} | "
            f"{m.bytes_before / 2**20:.2f} -> {m.bytes_after / 2**20:.2f} |"
        )
    return "\n".join(rows)


# ---- figure ----------------------------------------------------------------------------------------
def _layer_order(layers) -> list:
    def key(la):
        kind = la["kind"]
        return (
            la["index"] if la["index"] is not None else -1,
            KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER),
            la["name"],
        )

    return sorted(layers, key=key)


def plot_model_report(
    data: dict[str, Any] | Sequence[ModelMetrics], png_path: str | os.PathLike, *, focus: str | None = None
) -> Path:
    """`data`: report_data(...) or a list of ModelMetrics. Per model: per-layer SQNR (x = layer index,
    one marker per projection kind; DuQuant filled per rotation, RTN hollow) of the `focus` preset
    (default: the first measured), and the output error (final rel L2) of every variant vs RTN.
    Written with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not isinstance(data, dict):
        data = report_data(data)
    models = list(data["models"].items())
    if not models:
        raise ValueError("nothing to plot: no model metrics")
    fig = Figure(figsize=(15, 4.6 * len(models)), dpi=100)
    FigureCanvasAgg(fig)
    colors = {"svd": "#4c72b0", "greedy": "#55a868", "rtn": "#c44e52"}
    for r, (model, entry) in enumerate(models):
        variants = entry["variants"]
        presets = []
        for v in variants:
            if v["preset"].split("-")[0] not in presets:
                presets.append(v["preset"].split("-")[0])
        fp = focus if focus in presets else presets[0]
        ax = fig.add_subplot(len(models), 2, 2 * r + 1)
        shown = [v for v in variants if v["preset"].split("-")[0] == fp]
        rtn_drawn = False
        kinds_seen = set()
        for v in shown:
            rot = v["settings"].get("rotation", "svd")
            layers = _layer_order(v["layers"])
            n_kinds = len({la["kind"] for la in layers}) or 1
            kinds = sorted(
                {la["kind"] for la in layers}, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99
            )
            for la in layers:
                idx = la["index"] if la["index"] is not None else 0
                x = idx + (kinds.index(la["kind"]) + 0.5) / n_kinds - 0.5
                mk = KIND_MARKERS.get(la["kind"], "o")
                kinds_seen.add(la["kind"])
                ax.scatter([x], [la["sqnr_db"]], marker=mk, color=colors.get(rot, "#8172b2"), s=22, zorder=3)
                if la["rtn_sqnr_db"] is not None and not rtn_drawn:
                    ax.scatter(
                        [x],
                        [la["rtn_sqnr_db"]],
                        marker=mk,
                        facecolors="none",
                        edgecolors=colors["rtn"],
                        s=30,
                        zorder=2,
                    )
            if any(la["rtn_sqnr_db"] is not None for la in layers):
                rtn_drawn = True
        handles = [
            Line2D(
                [],
                [],
                color=colors.get(v["settings"].get("rotation", "svd"), "#8172b2"),
                marker="o",
                linestyle="",
                label=f"DuQuant {v['settings'].get('rotation', 'svd')} (mean {v['mean_sqnr_db']:.2f} dB)",
            )
            for v in shown
        ]
        rtn_means = [v["mean_rtn_sqnr_db"] for v in shown if v["mean_rtn_sqnr_db"] is not None]
        if rtn_means:
            handles.append(
                Line2D(
                    [],
                    [],
                    color=colors["rtn"],
                    marker="o",
                    markerfacecolor="none",
                    linestyle="",
                    label=f"plain RTN (mean {rtn_means[0]:.2f} dB)",
                )
            )
        handles += [
            Line2D([], [], color="0.3", marker=KIND_MARKERS.get(k, "o"), linestyle="", label=k)
            for k in KIND_ORDER
            if k in kinds_seen
        ]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        s = shown[0]["settings"] if shown else {}
        ax.set_title(
            f"{model} ({entry['fingerprint']}): per-layer SQNR, preset {fp} "
            f"(W{s.get('wbits_default')}A{s.get('abits')})",
            fontsize=9,
        )
        idxs = sorted({la["index"] for v in shown for la in v["layers"] if la["index"] is not None})
        if idxs and len(idxs) <= 40:
            ax.set_xticks(idxs)
        ax.set_xlabel("layer index (markers: projection kind)")
        ax.set_ylabel("SQNR, dB (higher is better)")
        ax.grid(alpha=0.3)
        # output error per variant
        ax2 = fig.add_subplot(len(models), 2, 2 * r + 2)
        labels, dq, rtn = [], [], []
        for v in variants:
            labels.append(v["label"])
            dq.append(v["output"]["rel_l2"])
            rtn.append(None if v["output_rtn"] is None else v["output_rtn"]["rel_l2"])
        xs = list(range(len(labels)))
        ax2.bar(
            [x - 0.2 for x in xs],
            dq,
            width=0.4,
            color=[colors.get(v["settings"].get("rotation", "svd"), "#8172b2") for v in variants],
            label="DuQuant",
        )
        rx = [x + 0.2 for x, val in zip(xs, rtn, strict=True) if val is not None]
        ax2.bar(
            rx,
            [val for val in rtn if val is not None],
            width=0.4,
            color="none",
            edgecolor=colors["rtn"],
            hatch="//",
            label="plain RTN, same bits",
        )
        ax2.set_xticks(xs)
        ax2.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        what = "action chunk" if model.startswith("pi05") else "sentence embeddings"
        ax2.set_ylabel(f"relative L2 error of the {what}")
        ax2.set_title(f"{model}: output error vs FP per preset (lower is better)", fontsize=9)
        ax2.legend(fontsize=7)
        ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight")
    return png


def write_model_report(
    metrics: Sequence[ModelMetrics],
    out_dir: str | os.PathLike,
    *,
    focus: str | None = None,
    stem: str = "model",
) -> dict[str, Path]:
    """Write `<stem>.png`, `<stem>.json` and `<stem>.md` (markdown table) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report_data(metrics)
    png = plot_model_report(data, out / f"{stem}.png", focus=focus)
    data["png"] = str(png)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown_table(metrics) + "\n")
    return {"png": png, "json": out / f"{stem}.json", "md": out / f"{stem}.md"}
