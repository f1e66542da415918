"""`duquant rollouts`: run LIBERO episodes of a pi0.5 checkpoint (FP or quantized) under openpi's protocol.

    duquant rollouts --ckpt DIR --suite libero_spatial --tasks 0-9 --trials 50 --workers 8 \\
        --out results/spatial_B.jsonl --preset B
    duquant rollouts --ckpt DIR --suite libero_spatial --out results/spatial_fp.jsonl     # FP (no preset)

Every finished episode is appended to --out at once; rerunning the same command resumes (finished
episodes are never rerun or lost). Exit codes: 0 all requested episodes recorded, 1 the run stopped
early (a worker or the policy failed; rerun to resume), 2 bad arguments or missing LIBERO install.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rollouts",
        help="run LIBERO episodes of a checkpoint (openpi protocol, resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="pi0.5 checkpoint directory (openpi or lerobot layout)")
    p.add_argument(
        "--suite",
        default="libero_spatial",
        help="libero_spatial, libero_object, libero_goal, libero_10 or libero_90 (comma-separated: several)",
    )
    p.add_argument("--tasks", default=None, help="task ids, e.g. 0,1,5-9 (default all)")
    p.add_argument("--trials", type=int, default=50, help="trials (init states) per task, 1..50 (default 50)")
    p.add_argument(
        "--seed", type=int, default=7, help="env seed; also keys the policy noise (default 7, openpi's)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) - 1)),
        help="parallel env workers, ~2.1 GB RAM each (default min(8, cores-1))",
    )
    p.add_argument("--out", required=True, help="results JSONL (appended; resumed when it exists)")
    p.add_argument(
        "--preset",
        default=None,
        help="DuQuant preset (A, B, precision, speed, fp); OPENPI_DUQUANT_* variables apply too. Without "
        "--preset and without any OPENPI_DUQUANT_* variable the run is FP (nothing quantized, labelled fp)",
    )
    p.add_argument(
        "--backend", choices=("local", "ray"), default="local", help="episode scheduler (default local)"
    )
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local instance)"
    )
    p.add_argument(
        "--policy-backend",
        choices=("builtin", "openpi"),
        default="builtin",
        help="load --ckpt with our pi0.5 (builtin) or openpi's own loader",
    )
    p.add_argument("--tokenizer", default=None, help="PaliGemma SentencePiece tokenizer model")
    p.add_argument("--calib", default="synthetic", metavar="SOURCE",
                   help="calibration observations: synthetic (default), libero:<suite> or FILE.npz")
    p.add_argument("--device", default=None, help="torch device for the policy (default cuda if available)")
    p.add_argument("--videos", default=None, metavar="DIR", help="write an MP4 of every failed episode here")
    p.add_argument("--max-batch", type=int, default=None, help="most observations per policy call")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="override the suite's step budget (changes the protocol name: for smoke runs only)",
    )
    p.add_argument("--exact-path", action="store_true",
                   help="serve openpi's exact (slower) path instead of the fast one (docs/speed.md): rounding-level "
                        "differences can make single episodes diverge from a golden recorded on the exact path")
    p.add_argument("--serve", default="graphed", metavar="HOW",
                   help="how the fast path is served (docs/speed.md, \"Serving\"): graphed (default: CUDA-graphed, "
                        "batches padded to 1-2-4-8-16-32) or compiled (CUDA only: the step and prefix compiled, "
                        "batches padded to 8, the H200's fastest; use with --max-batch 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pytest_duquant.config import env_requests_duquant, from_env
    from pytest_duquant.libero import sim_setup
    from pytest_duquant.libero.harness import RolloutError, run_rollouts
    from pytest_duquant.libero.policy import PolicyUnavailableError, pi05_policy_factory
    from pytest_duquant.libero.protocol import SUITE_TASKS, ProtocolSettings, check_suite, parse_ids
    from pytest_duquant.results import ResultsError

    try:
        suites = [check_suite(s.strip()) for s in args.suite.split(",") if s.strip()]
        tasks = {s: parse_ids(args.tasks, n=SUITE_TASKS[s], what="--tasks") for s in suites}
        if not 1 <= args.trials <= 50:
            raise ValueError(f"--trials {args.trials}: must be 1..50 (each task has 50 init states)")
        for s in suites:
            sim_setup.check_suite_assets(s)
        sim_setup.libero_package_root()
        preset = args.preset
        if preset is None and not env_requests_duquant(os.environ):
            preset = "fp"  # docs/contract.md, "Configuration": quantization is on only when asked for
        config = from_env(os.environ, preset=preset)
        print(f"duquant rollouts: {config.describe()}"
              + ("" if config.enabled else " (FP reference run: results labelled fp)"), file=sys.stderr)
        factory = pi05_policy_factory(
            args.ckpt, config, tokenizer=args.tokenizer, backend=args.policy_backend, device=args.device,
            calibration=args.calib, fast=not args.exact_path,
            serve=None if args.exact_path and args.serve == "graphed" else args.serve,
        )
    except (ValueError, sim_setup.LiberoSetupError, PolicyUnavailableError) as exc:
        print(f"duquant rollouts: {exc}", file=sys.stderr)
        return 2
    protocol = ProtocolSettings(max_steps=args.max_steps)
    cache: dict = {}

    def policy():  # loaded once, on first need, shared by the suites
        if "p" not in cache:
            cache["p"] = factory()
        return cache["p"]

    policy.fingerprint, policy.preset = factory.fingerprint, factory.preset
    code = 0
    for suite in suites:
        try:
            summary = run_rollouts(
                policy,
                suite,
                tasks[suite],
                args.trials,
                args.seed,
                args.workers,
                args.out,
                protocol=protocol,
                backend=args.backend,
                video_dir=args.videos,
                progress=not args.no_progress,
                max_batch=args.max_batch,
                ray_address=args.ray_address,
            )
        except (RolloutError, ResultsError) as exc:
            print(f"duquant rollouts: {suite}: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, RolloutError) else 2
        stats = summary.stats()
        stats.pop("per_suite", None)
        print(json.dumps({"suite": suite, "results": str(summary.results_path), **stats}))
        code = max(code, 0 if summary.complete else 1)
    return code
