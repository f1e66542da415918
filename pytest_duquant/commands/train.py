"""`duquant train`: train the reference pi0.5-family policy from scratch on demonstrations.

    duquant train --demos DIR --out CKPT [--steps 6000] [--batch 128] [--seed 0] [--holdout 45-49] \\
        [--max-minutes 8] [--stop-after-minutes 4] [--gpus 2] [--device cuda]

Writes a checkpoint in openpi's layout (model.safetensors, config.json, norm stats, tokenizer.model)
plus calibration.npz, train_log.json and loss.png; ``--ckpt CKPT`` then loads it like any other.
An interrupted run (kill, ``--stop-after-minutes``) resumes from CKPT/train_state.pt when rerun;
``--max-minutes`` is the training time of all runs together (the LR schedule spans them). ``--gpus N``
trains on N GPUs (torchrun, DistributedDataParallel, --batch per GPU).
Exit codes: 0 trained, 2 bad arguments or no demonstrations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train the reference policy on demonstrations (GPU)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", required=True, help="folder written by `duquant demos`")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--variant", default="reference", choices=("reference", "dummy"))
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", default=None, help="init states kept out of training, e.g. 45-49")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="training time budget over all (resumed) runs; the LR decays over it")
    p.add_argument("--stop-after-minutes", type=float, default=None,
                   help="end this run after this long (resumable; an interim checkpoint is written)")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs to train on (one process each, via torchrun; with --device cpu: processes)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available)")
    p.add_argument("--no-augment", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pytest_duquant.libero.demos import demo_files
    from pytest_duquant.libero.protocol import INIT_STATES_PER_TASK, parse_ids
    from pytest_duquant.training.train import TrainSettings, train

    try:
        holdout = tuple(parse_ids(args.holdout, n=INIT_STATES_PER_TASK, what="--holdout")) if args.holdout else ()
        if not demo_files(args.demos):
            raise ValueError(f"--demos {args.demos}: no successful demonstrations there (run `duquant demos`)")
        if args.steps < 1 or args.batch < 1:
            raise ValueError("--steps and --batch must be >= 1")
        if args.gpus < 1:
            raise ValueError("--gpus must be >= 1")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.gpus > 1 and device.startswith("cuda") and torch.cuda.device_count() < args.gpus:
            raise ValueError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPU(s)")
    except ValueError as exc:
        print(f"duquant train: {exc}", file=sys.stderr)
        return 2
    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:  # start one process per GPU; each reruns this command
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
               "-m", "pytest_duquant", *sys.argv[sys.argv.index("train"):]]
        return subprocess.call(cmd)
    log = train(TrainSettings(demos=args.demos, out=args.out, variant=args.variant, steps=args.steps,
                              batch=args.batch, lr=args.lr, seed=args.seed, device=device,
                              max_minutes=args.max_minutes, stop_after_minutes=args.stop_after_minutes,
                              holdout_trials=holdout, augment=not args.no_augment))
    if "final_loss" in log:  # rank 0 (the only one that writes)
        print(json.dumps({k: log[k] for k in ("stopped", "steps_done", "trained_min", "final_loss", "wall_s",
                                              "device", "processes")}))
    return 0
