#!/usr/bin/env python
"""LIBERO success of a checkpoint under FP and a matrix of quantization settings, in one process.

    python scripts/reference_eval.py --ckpt golden/reference/pi05-reference --out results/ \\
        --suite libero_object --fp-trials 0-49 --matrix-trials 0-9 --workers 30 [--deadline-min 9]

Writes one results JSONL per setting (``<out>/<suite>_<name>.jsonl``, the harness's resumable
format: rerun the same command to finish an interrupted run) and ``<out>/summary.json`` (episodes,
successes, rate, wall time, episodes/hour per setting; device; versions; date). Settings:

  fp          no quantization (the golden's run)
  A, B, precision, speed            the DuQuant presets
  rtn_w4a8    W4A8 round-to-nearest, no transforms (BLOCK=1, PERMUTE=0, ROW_ROT=0 on preset A)
  w3, w2      preset A's DuQuant at 3 and 2 weight bits
  rtn_w2      W2 round-to-nearest, no transforms: the deliberately broken quantizer CI must catch

Quantized settings calibrate on the checkpoint's own ``calibration.npz`` when it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pytest_duquant.policies.reference import SETTINGS, setting_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--suite", default="libero_object")
    p.add_argument("--tasks", default=None)
    p.add_argument("--fp-trials", default="0-49")
    p.add_argument("--matrix-trials", default="0-9")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list, run in this order")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--deadline-min", type=float, default=None, help="start no new setting after this")
    args = p.parse_args(argv)

    import torch

    from pytest_duquant.libero import sim_setup
    from pytest_duquant.libero.harness import run_rollouts
    from pytest_duquant.libero.policy import pi05_policy_factory
    from pytest_duquant.libero.protocol import INIT_STATES_PER_TASK, SUITE_TASKS, parse_ids

    t0 = time.perf_counter()
    sim_setup.prepare()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        print(f"unknown settings {unknown}; known: {list(SETTINGS)}", file=sys.stderr)
        return 2
    tasks = parse_ids(args.tasks, n=SUITE_TASKS[args.suite])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    calib = Path(args.ckpt) / "calibration.npz"
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"settings": {}}
    for name in names:
        if args.deadline_min is not None and time.perf_counter() - t0 > 60 * args.deadline_min:
            print(f"deadline reached: {name} and later settings not started", flush=True)
            break
        trials = parse_ids(args.fp_trials if name == "fp" else args.matrix_trials, n=INIT_STATES_PER_TASK)
        config = setting_config(name, packdir=str(out / "packs"))  # OPENPI_DUQUANT_* variables ignored
        factory = pi05_policy_factory(args.ckpt, config, device=device,
                                      calibration=str(calib) if calib.is_file() else None)
        t1 = time.perf_counter()
        s = run_rollouts(factory, args.suite, tasks, trials, args.seed, args.workers,
                         out / f"{args.suite}_{name}.jsonl", backend="local", progress=False)
        stats = s.stats()
        stats.pop("per_suite", None)
        recs = s.records
        summary["settings"][name] = {
            "preset": SETTINGS[name][0], "overrides": SETTINGS[name][1], "episodes": len(recs),
            "successes": sum(bool(r["success"]) for r in recs), "trials": args.fp_trials if name == "fp"
            else args.matrix_trials, "wall_s": round(time.perf_counter() - t1, 1), "stats": stats,
            "complete": s.complete,
        }
        r = summary["settings"][name]
        print(f"{name}: {r['successes']}/{r['episodes']} in {r['wall_s']} s", flush=True)
        summary.update({
            "ckpt": str(args.ckpt), "suite": args.suite, "seed": args.seed, "workers": args.workers,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
            "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
