"""Model report: per-layer SQNR (DuQuant vs plain RTN, by layer index and projection type) and output error
per preset, as a PNG (matplotlib, Agg, no pyplot) and a JSON of the same numbers.

    metrics = collect_metrics(policy_factory(None), presets=["A", "B"])    # or ModelMetrics from the suites
    write_model_report(metrics, "report/")                                  # model.png + model.json

`write_session_report(config, out_dir, ...)` is what the pytest plugin calls at the end of a run with
`--duquant-report=DIR`: it reuses the metrics the model suite measured in this session (`remember`), or
measures the session preset when the suite did not run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pytest_duquant.config import DuQuantConfig, from_env, replace
from pytest_duquant.model_metrics import ModelMetrics, Probe

SESSION_METRICS: list[ModelMetrics] = []
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


def remember(metrics: ModelMetrics) -> ModelMetrics:
    """Keep metrics measured during this process for the end-of-session report (one per model+label)."""
    for i, m in enumerate(SESSION_METRICS):
        if m.model == metrics.model and m.preset == metrics.preset and m.settings == metrics.settings:
            SESSION_METRICS[i] = metrics
            return metrics
    SESSION_METRICS.append(metrics)
    return metrics


def label_of(m: ModelMetrics) -> str:
    rot = m.settings.get("rotation", "svd")
    return m.preset if rot == "svd" or m.preset.endswith(rot) else f"{m.preset}-{rot}"


# ---- measuring -------------------------------------------------------------------------------------
def preset_configs(
    presets: Sequence[str], rotations: Sequence[str] = ("svd", "greedy"), base: DuQuantConfig | None = None
) -> list[tuple[str, DuQuantConfig]]:
    """(label, config) for each preset x rotation; label is the preset, plus '-greedy' for greedy."""
    out = []
    for p in presets:
        cfg = from_env({}, preset=p) if base is None or base.preset.lower() != p.lower() else base
        if not cfg.enabled:
            continue
        for rot in rotations:
            c = cfg if cfg.rotation == rot else replace(cfg, rotation=rot)
            out.append((cfg.preset if rot == "svd" else f"{cfg.preset}-{rot}", c))
    return out


def collect_metrics(
    probe: Probe, configs: Sequence[tuple[str, DuQuantConfig]], *, progress=None
) -> list[ModelMetrics]:
    """Measure each config; RTN only once per RTN-relevant setting group (rotation does not change RTN)."""
    out = []
    rtn_done: dict[str, ModelMetrics] = {}
    for label, cfg in configs:
        if progress:
            progress(f"{probe.model_name}: {label}")
        key = json.dumps(
            {
                k: v
                for k, v in _settings(probe, cfg).items()
                if k not in ("rotation", "block", "block_out", "ls", "permute", "row_rot")
            },
            sort_keys=True,
        )
        m = probe.measure(cfg, rtn=key not in rtn_done, label=label)
        if key in rtn_done:
            base = rtn_done[key]
            m.output_rtn = base.output_rtn
            rtn = {la.name: la.rtn_sqnr_db for la in base.layers}
            for la in m.layers:
                la.rtn_sqnr_db = rtn.get(la.name)
        else:
            rtn_done[key] = m
        out.append(m)
    return out


def _settings(probe: Probe, cfg: DuQuantConfig) -> dict:
    from pytest_duquant.model_metrics import numeric_settings

    return numeric_settings(probe.scoped(cfg))


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


def write_success_report(
    results: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    libero_goldens: str | os.PathLike | None = None,
) -> dict[str, Path] | None:
    """The LIBERO success figure (reporting.success) from results JSONL files, when that module exists."""
    try:
        from pytest_duquant.reporting.success import plot_success, success_table
        from pytest_duquant.results_io import read_results
    except ImportError:
        return None
    records = [r for path in results for r in read_results(path)]
    if not records:
        return None
    goldens = None
    if libero_goldens is not None:
        from pytest_duquant.golden_libero import GoldenError, find_golden, read_golden

        goldens = {}
        for suite, fp in sorted({(r.suite, r.fingerprint) for r in records if r.fingerprint}):
            try:
                goldens[suite] = read_golden(find_golden(libero_goldens, fp, suite))
            except (GoldenError, OSError):
                continue
    out = Path(out_dir)
    plot_success(success_table(records, goldens), out / "success.png", out / "success.json")
    return {"png": out / "success.png", "json": out / "success.json"}


def write_session_report(
    config: DuQuantConfig,
    out_dir: str | os.PathLike,
    *,
    ckpt: str | os.PathLike | None = None,
    tokenizer=None,
    backend: str = "builtin",
    results: Sequence[str | os.PathLike] = (),
    libero_goldens: str | os.PathLike | None = None,
    metrics: Sequence[ModelMetrics] | None = None,
) -> dict[str, Path]:
    """End-of-run report for `pytest --duquant-report=DIR` (called from the plugin's sessionfinish).

    Uses `metrics`, else what the model suite measured in this process (SESSION_METRICS), else measures
    the session config (its rotation and greedy) on the session policy. Adds the LIBERO success figure
    when results JSONL files are given. Returns the written paths.
    """
    ms = list(metrics) if metrics is not None else list(SESSION_METRICS)
    if not ms and config.enabled:
        from pytest_duquant.model_metrics import PolicyProbe
        from pytest_duquant.policies.session import policy_factory

        make = policy_factory(ckpt, tokenizer=tokenizer, backend=backend)
        probe = PolicyProbe(make(), fingerprint=make.fingerprint)
        try:
            ms = collect_metrics(probe, preset_configs([config.preset], base=config))
        finally:
            probe.close()
    paths: dict[str, Path] = {}
    if ms:
        paths.update(write_model_report(ms, out_dir, focus=config.preset))
    if results:
        succ = write_success_report(results, out_dir, libero_goldens)
        if succ:
            paths.update({f"success_{k}": v for k, v in succ.items()})
    return paths
