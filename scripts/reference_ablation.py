#!/usr/bin/env python
"""Which DuQuant ingredient costs the reference policy accuracy: the action error of one setting at a time.

    python scripts/reference_ablation.py [--out docs/results/reference/ablation.json]

For each setting (a preset plus OPENPI_DUQUANT_* overrides) it runs README's main job (`duquant quantize`
on the shipped reference policy, calibrated on the checkpoint's calibration.npz, fresh pack folder) and
reads its report: the relative L2 and max abs error of the 10-step action chunk against the FP policy on
the same observations and noise. CPU, a few seconds per setting. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

SETTINGS: list[tuple[str, str, dict[str, str]]] = [
    ("A", "preset A (BLOCK 16, permute, row rotation restore)", {}),
    ("A", "A, PERMUTE=0", {"PERMUTE": "0"}),
    ("A", "A, ROW_ROT=0", {"ROW_ROT": "0"}),
    ("A", "A, LS=0 (no smoothing)", {"LS": "0"}),
    ("A", "A, BLOCK=64", {"BLOCK": "64"}),
    ("A", "A, BLOCK=128", {"BLOCK": "128"}),
    ("A", "A, dynamic activations", {"ACT_DYNAMIC": "1"}),
    ("A", "RTN W4A8 (BLOCK=1, PERMUTE=0, ROW_ROT=0)", {"BLOCK": "1", "PERMUTE": "0", "ROW_ROT": "0"}),
    ("B", "preset B (BLOCK 64, ACT_PCT 98)", {}),
    ("B", "B, ACT_PCT=99.9", {"ACT_PCT": "99.9"}),
    ("speed", "preset speed (BLOCK 128, ACT_PCT 98)", {}),
    ("precision", "preset precision (W6A8, BLOCK 32)", {}),
]


def measure(preset: str, overrides: dict[str, str]) -> dict:
    from pytest_duquant.cli import main as cli

    keep = {k: v for k, v in os.environ.items() if k.startswith("OPENPI_DUQUANT_")}
    for k in keep:
        del os.environ[k]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({f"OPENPI_DUQUANT_{k}": v for k, v in overrides.items()})
        os.environ["OPENPI_DUQUANT_PACKDIR"] = str(Path(tmp) / "packs")
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its table: not ours
                rc = cli(["quantize", "--preset", preset, "--out", str(Path(tmp) / "r"), "--no-rtn"])
            if rc != 0:
                return {"error": f"duquant quantize exited {rc}"}
            report = json.loads((Path(tmp) / "r" / "report.json").read_text())
        finally:
            for k in [k for k in os.environ if k.startswith("OPENPI_DUQUANT_")]:
                del os.environ[k]
            os.environ.update(keep)
    out = report["output"]
    layers = report["layers"]
    return {"rel_l2": out["rel_l2"], "max_abs": out["max_abs"],
            "mean_layer_sqnr_db": sum(la["sqnr_db"] for la in layers) / len(layers)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/reference/ablation.json")
    args = p.parse_args(argv)
    rows = []
    for preset, label, overrides in SETTINGS:
        print(f"... {label}", file=sys.stderr, flush=True)
        rows.append({"label": label, "preset": preset, "overrides": overrides, **measure(preset, overrides)})
    Path(args.out).write_text(json.dumps({"policy": "shipped reference checkpoint", "rows": rows}, indent=1) + "\n")
    print("| setting | action rel. L2 vs FP | action max abs | mean layer SQNR (dB) |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']} | {r['error']} | | |")
        else:
            print(f"| {r['label']} | {r['rel_l2']:.4f} | {r['max_abs']:.3f} | {r['mean_layer_sqnr_db']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
