"""Success rate of the scripted LIBERO expert (pytest_duquant.libero.expert) per task, unrendered.

    python scripts/expert_success.py --suite libero_object --trials 50 --workers 2 \
        --out docs/results/expert_libero_object.json

Runs openpi's protocol (seed 7, 10 wait steps, the suite's max steps; success = LIBERO's ``done``)
on LIBERO's ``ControlEnv`` without a renderer (physics identical to ``OffScreenRenderEnv``;
``--env libero`` uses the project's ``LiberoEnv`` instead). One line per episode, a per-task table
at the end, and a JSON summary. Resumable: every episode is appended to ``<out>.episodes.jsonl``; a
rerun with the same suite / seed / noise / expert version skips the episodes already there.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

_ENVS: dict = {}


def _build_env(suite: str, task_id: int, kind: str):
    key = (suite, task_id, kind)
    if key in _ENVS:
        return _ENVS[key]
    for k in list(_ENVS):
        env = _ENVS.pop(k)[0]
        try:
            env.close()
        except Exception:  # noqa: BLE001
            pass
    from pytest_duquant.libero import sim_setup

    sim_setup.prepare()
    from libero.libero import benchmark

    bench = benchmark.get_benchmark_dict()[suite]()
    task = bench.get_task(task_id)
    init_states = bench.get_task_init_states(task_id)
    if kind == "libero":
        from pytest_duquant.libero.episode import LiberoEnv
        from pytest_duquant.libero.protocol import ProtocolSettings

        env = LiberoEnv(suite, task_id, ProtocolSettings())
    else:
        from libero.libero.envs.env_wrapper import ControlEnv

        env = ControlEnv(
            bddl_file_name=bench.get_task_bddl_file_path(task_id),
            has_offscreen_renderer=False,
            use_camera_obs=False,
        )
    _ENVS[key] = (env, init_states, str(task.language))
    return _ENVS[key]


def _run_chunk(job: dict) -> list[dict]:
    from pytest_duquant.libero.expert import run_expert_episode
    from pytest_duquant.libero.protocol import MAX_STEPS

    env, init_states, language = _build_env(job["suite"], job["task_id"], job["env"])
    out = []
    for trial in job["trials"]:
        noise_seed = job["noise_seed"] + 1000 * job["task_id"] + trial
        r = run_expert_episode(
            env,
            init_states[trial],
            seed=job["seed"],
            max_steps=MAX_STEPS[job["suite"]],
            action_noise=job["noise"],
            noise_seed=noise_seed,
        )
        if r["error"] is None:
            r.pop("traceback", None)
        r.update(suite=job["suite"], task_id=job["task_id"], trial=trial, instruction=language)
        out.append(r)
    return out


def _parse_trials(text: str) -> list[int]:
    from pytest_duquant.libero.protocol import INIT_STATES_PER_TASK, parse_ids

    text = str(text).strip()
    if text.isdigit():
        n = int(text)
        if not 1 <= n <= INIT_STATES_PER_TASK:
            raise SystemExit(f"--trials {n}: 1..{INIT_STATES_PER_TASK}")
        return list(range(n))
    return parse_ids(text, n=INIT_STATES_PER_TASK, what="trials")


def summarize(records: list[dict], suite: str) -> dict:
    per_task: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: (r["task_id"], r["trial"])):
        d = per_task.setdefault(
            str(r["task_id"]),
            {
                "successes": 0,
                "episodes": 0,
                "mean_steps": None,
                "instruction": r.get("instruction"),
                "failures": [],
                "_steps": [],
                "_wall": [],
            },
        )
        d["episodes"] += 1
        d["_wall"].append(r["wall_s"])
        if r["success"]:
            d["successes"] += 1
            d["_steps"].append(r["steps"])
        else:
            d["failures"].append(r["trial"])
    tot_s = tot_e = 0
    all_steps, all_wall = [], []
    for d in per_task.values():
        steps, wall = d.pop("_steps"), d.pop("_wall")
        d["success_rate"] = round(d["successes"] / d["episodes"], 4)
        d["mean_steps"] = round(sum(steps) / len(steps), 1) if steps else None
        d["mean_wall_s"] = round(sum(wall) / len(wall), 2)
        tot_s += d["successes"]
        tot_e += d["episodes"]
        all_steps += steps
        all_wall += wall
    overall = {
        "successes": tot_s,
        "episodes": tot_e,
        "success_rate": round(tot_s / tot_e, 4) if tot_e else None,
        "mean_steps": round(sum(all_steps) / len(all_steps), 1) if all_steps else None,
        "mean_wall_s_per_episode": round(sum(all_wall) / len(all_wall), 2) if all_wall else None,
    }
    return {"suite": suite, "per_task": per_task, "overall": overall}


def print_table(summary: dict) -> None:
    print(f"\n{'task':>4} {'success':>9} {'rate':>7} {'steps':>7}  instruction")
    for tid, d in summary["per_task"].items():
        steps = "-" if d["mean_steps"] is None else f"{d['mean_steps']:.1f}"
        print(
            f"{tid:>4} {d['successes']:>4}/{d['episodes']:<4} {100 * d['success_rate']:>6.1f}% {steps:>7}  "
            f"{d['instruction']}" + (f"  failed: {d['failures']}" if d["failures"] else "")
        )
    o = summary["overall"]
    print(
        f"{'all':>4} {o['successes']:>4}/{o['episodes']:<4} {100 * (o['success_rate'] or 0):>6.1f}% "
        f"{o['mean_steps'] or '-':>7}  ({o['mean_wall_s_per_episode']} s/episode unrendered, per worker)"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="libero_object")
    ap.add_argument("--tasks", default="all", help="ids like 0,2,5-7 (default all)")
    ap.add_argument("--trials", default="50", help="N (init states 0..N-1) or ids like 0-19 (default 50)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.0, help="DART action noise std (action units)")
    ap.add_argument("--noise-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=10, help="episodes of one task per worker job")
    ap.add_argument(
        "--env",
        choices=("control", "libero"),
        default="control",
        help="control: LIBERO ControlEnv without renderer; libero: the project's LiberoEnv",
    )
    ap.add_argument("--out", default=None, help="summary JSON (episodes go to <out>.episodes.jsonl)")
    args = ap.parse_args(argv)

    from pytest_duquant.libero.expert import EXPERT_VERSION
    from pytest_duquant.libero.protocol import SUITE_TASKS, check_suite, parse_ids

    suite = check_suite(args.suite)
    tasks = parse_ids(args.tasks, n=SUITE_TASKS[suite])
    trials = _parse_trials(args.trials)
    ident = {"suite": suite, "seed": args.seed, "action_noise": float(args.noise), "expert_version": EXPERT_VERSION}

    records: list[dict] = []
    ep_path = Path(args.out + ".episodes.jsonl") if args.out else None
    done_keys = set()
    if ep_path and ep_path.is_file():
        for line in ep_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if all(r.get(k) == v for k, v in ident.items()) and r["task_id"] in tasks and r["trial"] in trials:
                if (r["task_id"], r["trial"]) not in done_keys:
                    done_keys.add((r["task_id"], r["trial"]))
                    records.append(r)
        if records:
            print(f"resuming: {len(records)} episodes already in {ep_path}")

    jobs = []
    for tid in tasks:
        todo = [tr for tr in trials if (tid, tr) not in done_keys]
        for i in range(0, len(todo), args.chunk):
            jobs.append(
                {
                    "suite": suite,
                    "task_id": tid,
                    "trials": todo[i : i + args.chunk],
                    "seed": args.seed,
                    "noise": float(args.noise),
                    "noise_seed": args.noise_seed,
                    "env": args.env,
                }
            )
    total = len(tasks) * len(trials)
    t0 = time.time()
    if ep_path:
        ep_path.parent.mkdir(parents=True, exist_ok=True)
    fh = ep_path.open("a") if ep_path else None

    def consume(batch):
        for r in batch:
            r.update(ident)
            records.append(r)
            if fh:
                fh.write(json.dumps(r) + "\n")
                fh.flush()
            mark = "OK  " if r["success"] else "FAIL"
            extra = (
                ""
                if r["success"]
                else f" phase={r['phase']} tries={r['tries']}" + (f" error={r['error']}" if r["error"] else "")
            )
            print(
                f"[{len(records):>4}/{total}] task {r['task_id']} trial {r['trial']:>2}: {mark} "
                f"{r['steps']:>3} steps {r['wall_s']:5.2f}s{extra}",
                flush=True,
            )

    if jobs:
        if args.workers <= 1:
            for job in jobs:
                consume(_run_chunk(job))
        else:
            # ProcessPoolExecutor, not Pool: a worker that dies (killed, out of memory) raises
            # BrokenProcessPool instead of hanging; the episodes done so far are kept (rerun resumes)
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_run_chunk, job) for job in jobs]
                try:
                    for fut in as_completed(futures):
                        consume(fut.result())
                except BrokenProcessPool as exc:
                    print(
                        f"a worker died ({exc}); {len(records)}/{total} episodes recorded, rerun to resume",
                        file=sys.stderr,
                    )
                    if fh:
                        fh.close()
                    return 3
    if fh:
        fh.close()

    summary = summarize(records, suite)
    summary.update(
        expert_version=EXPERT_VERSION,
        seed=args.seed,
        action_noise=float(args.noise),
        trials=trials if len(trials) != 50 else "0-49",
        env=args.env,
        protocol="openpi-libero-v1 (unrendered)" if args.env == "control" else "openpi-libero-v1",
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        host=f"{socket.gethostname()} ({os.cpu_count()} CPUs)",
        wall_s_this_run=round(time.time() - t0, 1),
        workers=args.workers,
    )
    print_table(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
