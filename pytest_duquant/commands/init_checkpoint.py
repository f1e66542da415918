"""`duquant init-checkpoint DIR --variant dummy|pi05 --seed N [--dtype float32|bfloat16]`.

Writes a random-initialised pi0.5 checkpoint in openpi's PyTorch layout: model.safetensors, config.json,
assets/physical-intelligence/libero/norm_stats.json (plausible LIBERO-like quantiles) and tokenizer.model
(a tiny SentencePiece model trained locally, not PaliGemma's, so the checkpoint works offline).
Same seed -> same weights on any machine. Exit status: 0 written, 2 unusable input.
"""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "init-checkpoint",
        help="write a random-init pi0.5 checkpoint (openpi layout) for CI and the embedded default",
        description=__doc__,
    )
    parser.add_argument("dir", help="output directory (created; must be empty unless --force)")
    parser.add_argument("--variant", choices=("dummy", "pi05"), default="dummy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="stored precision (default: float32 for dummy, bfloat16 for pi05)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing checkpoint")
    parser.set_defaults(func=run)


def run(args) -> int:
    from pytest_duquant.policies.session import init_checkpoint

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"duquant init-checkpoint: {out} is not empty (use --force to overwrite)", file=sys.stderr)
        return 2
    path = init_checkpoint(out, args.variant, args.seed, args.dtype)
    print(f"wrote {args.variant} checkpoint (seed {args.seed}) to {path}")
    return 0
