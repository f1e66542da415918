"""`duquant demos`: record the scripted expert's successful LIBERO episodes as training demonstrations.

    duquant demos --suite libero_object --out DIR [--tasks 0-9] [--trials 0-44] [--repeats 2] \\
        [--noise 0.1] [--workers 8]

Each (task, init state) is run ``--repeats`` times: repeat 0 by the clean expert, the others with
DART-style noise of std ``--noise`` on the executed arm actions (labels stay clean). Observations are
exactly what the rollout protocol feeds a policy (docs/demos.md has the format). Episodes are
appended to ``DIR/demos.jsonl`` as they end; a rerun skips every recorded episode (resume). Only
successful episodes keep a file. Exit codes: 0 done, 2 bad arguments or LIBERO missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demos", help="record scripted-expert demonstrations (resumable)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="libero_object", help="LIBERO suite (default libero_object)")
    p.add_argument("--out", required=True, help="output folder (created; resumed when it exists)")
    p.add_argument("--tasks", default=None, help="task ids, e.g. 0,2,5-9 (default all)")
    p.add_argument("--trials", default=None, help="init states, e.g. 0-44 (default all 50)")
    p.add_argument("--repeats", type=int, default=1, help="episodes per init state (default 1)")
    p.add_argument("--noise", type=float, default=0.1, help="action noise std of repeats >= 1 (default 0.1)")
    p.add_argument("--seed", type=int, default=7, help="env seed (default 7, openpi's)")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="parallel env processes (default min(8, cores-1))")
    p.add_argument("--chunk", type=int, default=5, help="episodes per worker task (one env build each)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this long (episodes in flight are dropped; rerun to resume)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pytest_duquant.libero import sim_setup
    from pytest_duquant.libero.demos import collect_demos, plan_jobs
    from pytest_duquant.libero.protocol import INIT_STATES_PER_TASK, SUITE_TASKS, check_suite, parse_ids

    try:
        suite = check_suite(args.suite)
        tasks = parse_ids(args.tasks, n=SUITE_TASKS[suite], what="--tasks")
        trials = parse_ids(args.trials, n=INIT_STATES_PER_TASK, what="--trials")
        if args.repeats < 1:
            raise ValueError(f"--repeats {args.repeats}: must be >= 1")
        if not 0 <= args.noise <= 1:
            raise ValueError(f"--noise {args.noise}: must be in [0, 1] (action units)")
        if args.workers < 1:
            raise ValueError(f"--workers {args.workers}: must be >= 1")
        sim_setup.check_suite_assets(suite)
        sim_setup.libero_package_root()
    except (ValueError, sim_setup.LiberoSetupError) as exc:
        print(f"duquant demos: {exc}", file=sys.stderr)
        return 2
    jobs = plan_jobs(suite, tasks, trials, args.repeats, noise=args.noise, seed=args.seed)
    records = collect_demos(jobs, args.out, workers=args.workers, chunk=args.chunk,
                            progress=not args.no_progress,
                            max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    mine = [r for r in records if (r["suite"], r["task_id"], r["trial"], r["repeat"]) in {j.key for j in jobs}]
    kept = sum(r["success"] for r in mine)
    frames = sum(r["frames"] for r in mine if r["success"])
    print(json.dumps({"suite": suite, "episodes": len(mine), "kept": kept, "frames": frames,
                      "out": str(args.out)}))
    return 0
