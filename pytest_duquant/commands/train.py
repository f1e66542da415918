"""`duquant train`: train the reference pi0.5-family policy from scratch on demonstrations.

    duquant train --demos DIR --out CKPT [--steps 6000] [--batch 128] [--seed 0] [--holdout 45-49] \\
        [--max-minutes 8] [--device cuda]

Writes a checkpoint in openpi's layout (model.safetensors, config.json, norm stats, tokenizer.model)
plus calibration.npz, train_log.json and loss.png; ``--ckpt CKPT`` then loads it like any other.
An interrupted run (kill, ``--max-minutes``) resumes from CKPT/train_state.pt when rerun.
Exit codes: 0 trained, 2 bad arguments or no demonstrations.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
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
    except ValueError as exc:
        print(f"duquant train: {exc}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log = train(TrainSettings(demos=args.demos, out=args.out, variant=args.variant, steps=args.steps,
                              batch=args.batch, lr=args.lr, seed=args.seed, device=device,
                              max_minutes=args.max_minutes, holdout_trials=holdout,
                              augment=not args.no_augment))
    print(json.dumps({k: log[k] for k in ("stopped", "steps_done", "final_loss", "wall_s", "device")}))
    return 0
