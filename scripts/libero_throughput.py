#!/usr/bin/env python
"""LIBERO episode throughput with 1 vs N env workers: policy ms/call, sim ms/step, episodes/hour.

Meant for the GPU machine (16 cores + H100; MuJoCo's EGL renders on the GPU there), offline:

    python scripts/libero_throughput.py --workers 1,4,8,15 --out libero_throughput.json
    python scripts/libero_throughput.py --ckpt $CKPT --preset B --workers 1,15 --out tp_B.json
    python scripts/libero_throughput.py --workers 14,14/7 --out tp.json   # 14/7: at most 7 per policy call

A worker count N/M caps each policy call at M observations: with M = N/2 half the workers step their
simulations while the policy serves the other half (the GPU and the CPUs overlap instead of taking turns).

Without --ckpt it builds the full-size pi0.5 with random weights in memory, drawn on the device (seconds on
a GPU; writing a checkpoint first takes ~2 minutes). A random policy never succeeds, so every episode runs
its whole step budget (libero_spatial: 220 + 10 steps): the worst case, and the same work for every N.
--compile-step / --compile-prefix serve the torch.compiled fast path, --short-query and --fuse its other
options (Pi05Policy.serve_fast); --batch-sizes 8 pads every policy call to 8 observations (one graph, one
compile) instead of to the next of 1, 2, 4, 8, 16, 32.

Measured, per worker count N (each run starts from an empty results file):
  wall_s, episodes, episodes_per_hour, steady_episodes_per_hour (after the first wave: start-up excluded),
  done_at_s (each episode's finish time), policy_calls, policy_ms_per_call, mean_batch, sim_ms_per_step
  (time inside env.step over all steps: 1 step in 5 renders the two cameras, see docs/libero.md).
Plus two micro-benchmarks: one env's ms/step with and without rendering, and the policy's ms/call at
batch 1 and at batch N (synthetic LIBERO-like observations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, installed or not


def _policy_factory(args):
    from pytest_duquant.config import from_env
    from pytest_duquant.libero.policy import pi05_policy_factory

    config = from_env(os.environ, preset=args.preset) if args.preset else None
    serve = serve_options(args)  # checked in main (serving_options)
    if args.ckpt is None:
        return _random_factory(args, config, serve), f"random {args.variant} (in memory, drawn on the device)"
    return pi05_policy_factory(args.ckpt, config, device=args.device, serve=serve), str(args.ckpt)


def serve_options(args) -> dict:
    """Pi05Policy.serve_fast's options from the command line (--compile-prefix implies --compile-step)."""
    return {"compile_step": args.compile_step or args.compile_prefix, "compile_prefix": args.compile_prefix,
            "short_query": args.short_query, "fuse": args.fuse,
            **({"batch_sizes": args.sizes} if args.sizes else {})}


def _random_factory(args, config, serve: dict):
    """The full-size pi0.5 with random weights drawn on the device, quantized under ``config`` if enabled."""
    from pytest_duquant.policies import session

    device = args.device or ("cuda" if _cuda() else "cpu")

    def make():
        policy = session.random_policy(args.variant, 0, args.dtype, device=device, draw_on_device=True)
        if config is not None and config.enabled:
            policy, _ = session.quantize_and_calibrate(policy, config)
            policy.preset = config.preset
        return policy.serve_fast(**serve)

    make.fingerprint = session.random_fingerprint(args.variant, 0, args.dtype, draw_on_device=True)
    make.preset = config.preset if config is not None and config.enabled else "fp"
    return make


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def sim_microbench(suite: str, task: int, steps: int) -> dict:
    from pytest_duquant.libero.episode import LiberoEnv
    from pytest_duquant.libero.protocol import DUMMY_ACTION, ProtocolSettings

    t0 = time.perf_counter()
    env = LiberoEnv(suite, task, ProtocolSettings())
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    env.seed(7)
    env.reset()
    env.set_init_state(env.init_states[0])
    reset = time.perf_counter() - t0
    out = {"env_build_s": round(build, 3), "env_reset_s": round(reset, 3)}
    for render in (True, False):
        env.step(list(DUMMY_ACTION), render=render)
        t0 = time.perf_counter()
        for _ in range(steps):
            env.step(list(DUMMY_ACTION), render=render)
        out[f"ms_per_step_{'rendered' if render else 'unrendered'}"] = round(
            1e3 * (time.perf_counter() - t0) / steps, 2
        )
    env.close()
    return out


def policy_microbench(policy, batch_sizes, calls: int) -> dict:
    from pytest_duquant.policies.pi05.processing import synthetic_observations

    obs = synthetic_observations(max(batch_sizes), seed=0, image_size=224)  # what the harness sends: 224 px
    out = {}
    for b in batch_sizes:
        batch = obs[:b]
        policy.infer_batch(batch, list(range(b)))  # warm-up (compile, caches)
        _sync()
        t0 = time.perf_counter()
        for i in range(calls):
            policy.infer_batch(batch, [i * b + j for j in range(b)])
        _sync()
        out[f"batch{b}_ms_per_call"] = round(1e3 * (time.perf_counter() - t0) / calls, 2)
    return out


def steady_rate(done_at: list[float], workers: int) -> float | None:
    """Episodes per hour once every worker has finished its first episode (start-up, env builds and the
    first compile excluded): the episodes finished after the `workers`-th one, over the time since it.
    None when fewer than two waves finished (too short to tell)."""
    t = sorted(done_at)
    if len(t) < 2 * workers or t[-1] <= t[workers - 1]:
        return None
    return 3600.0 * (len(t) - workers) / (t[-1] - t[workers - 1])


def _sync():
    if _cuda():
        import torch

        torch.cuda.synchronize()


def _run_spec(text: str) -> tuple[int, int | None]:
    """'14' -> (14, None); '14/7' -> (14, 7)."""
    n, _, m = text.strip().partition("/")
    try:
        n_i, m_i = int(n), (int(m) if m else None)
    except ValueError:
        raise ValueError(f"--workers {text!r}: expected N or N/M (integers)") from None
    if n_i < 1 or (m_i is not None and m_i < 1):
        raise ValueError(f"--workers {text!r}: N and M must be at least 1")
    return n_i, m_i


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="pi0.5 checkpoint (default: random full-size pi0.5)")
    p.add_argument("--preset", default=None, help="DuQuant preset to quantize with (default: FP)")
    p.add_argument("--variant", default="pi05", choices=("pi05", "dummy"),
                   help="the random policy's size without --ckpt (default: the full pi05)")
    p.add_argument("--suite", default="libero_spatial")
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--tasks", default=None,
                   help="task ids to spread a run's episodes over, e.g. 0-9 (default: --task; 50 init states each)")
    p.add_argument("--workers", default="1,8",
                   help="comma-separated worker counts, N or N/M (M: most observations per policy call; default 1,8)")
    p.add_argument("--episodes-per-worker", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16", help="dtype of the random policy (default bfloat16)")
    p.add_argument(
        "--policy-calls", type=int, default=10, help="calls per batch size in the policy micro-benchmark"
    )
    p.add_argument("--sim-steps", type=int, default=40, help="steps per mode in the sim micro-benchmark")
    p.add_argument("--compile-step", action="store_true",
                   help="serve the fast path with its Euler step torch.compiled (Pi05Model.compile_fast_step)")
    p.add_argument("--compile-prefix", action="store_true",
                   help="... and the prefix too (vision tower + language model K/V; implies --compile-step)")
    p.add_argument("--short-query", action="store_true",
                   help="the Euler steps' attention as short_query_attention (docs/speed.md)")
    p.add_argument("--fuse", action="store_true",
                   help="fused q/k/v and gate/up GEMMs and the steps' K/V buffer (Pi05Model.fuse_fast_projections)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch CPU threads of the serving process (default torch's: one per core, which the env "
                        "workers also use)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated padded batch sizes of the fast path (e.g. 8; default 1,2,4,8,16,32)")
    p.add_argument("--out", default="libero_throughput.json")
    args = p.parse_args(argv)
    try:
        runs = [_run_spec(w) for w in args.workers.split(",")]
    except ValueError as exc:
        p.error(str(exc))
    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else None
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r}: expected integers")
    if sizes is not None and min(sizes) < 1:
        p.error(f"--batch-sizes {args.batch_sizes!r}: sizes must be at least 1")
    args.sizes = sizes
    from pytest_duquant.libero.protocol import SUITE_TASKS, parse_ids

    try:
        args.task_ids = parse_ids(args.tasks if args.tasks is not None else str(args.task),
                                  n=SUITE_TASKS.get(args.suite, 10), what="--tasks")
    except ValueError as exc:
        p.error(str(exc))
    if args.torch_threads is not None and args.torch_threads < 1:
        p.error(f"--torch-threads {args.torch_threads}: must be at least 1")
    from pytest_duquant.libero.policy import serving_options

    try:  # e.g. --compile-step off CUDA: the library's one-line reason, before anything is loaded
        serving_options(serve_options(args), args.device or ("cuda" if _cuda() else "cpu"))
    except ValueError as exc:
        p.error(str(exc))

    from pytest_duquant.libero import sim_setup
    from pytest_duquant.libero.harness import run_rollouts

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    sim_setup.prepare()
    workers = [n for n, _ in runs]
    factory, ckpt = _policy_factory(args)
    t0 = time.perf_counter()
    policy = factory()
    load_s = time.perf_counter() - t0
    report = {
        "suite": args.suite,
        "task": args.task,
        "tasks": args.task_ids,
        "ckpt": ckpt,
        "preset": args.preset or "fp",
        **serve_options(args),
        "torch_threads": args.torch_threads,
        "fingerprint": factory.fingerprint,
        "policy_load_s": round(load_s, 2),
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "mujoco_gl": os.environ.get("MUJOCO_GL"),
        },
    }
    try:
        import torch

        report["host"]["torch"] = torch.__version__
        report["host"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    out_path = Path(args.out)

    def flush() -> None:  # after every measurement: a run cut by a time limit keeps what it measured
        out_path.write_text(json.dumps(report, indent=1))

    flush()
    print("sim micro-benchmark ...", flush=True)
    report["sim"] = sim_microbench(args.suite, args.task, args.sim_steps)
    print(json.dumps(report["sim"]), flush=True)
    flush()
    print("policy micro-benchmark ...", flush=True)
    report["policy"] = policy_microbench(policy, sorted({1, *workers, *(m for _, m in runs if m)}),
                                         args.policy_calls)
    print(json.dumps(report["policy"]), flush=True)
    flush()
    report["runs"] = []
    with tempfile.TemporaryDirectory(prefix="libero-throughput-") as tmp:
        for n, max_batch in runs:
            episodes = n * args.episodes_per_worker
            trials = list(range(min(50, -(-episodes // len(args.task_ids)))))
            cap = "" if max_batch is None else f", at most {max_batch} per policy call"
            print(f"{n} workers{cap}, {len(trials) * len(args.task_ids)} episodes ...", flush=True)
            out = Path(tmp) / f"w{n}-{max_batch}.jsonl"
            done_at: list[float] = []
            t_run = time.perf_counter()
            s = run_rollouts(policy, args.suite, args.task_ids, trials, 7, n, out, backend="local",
                             max_batch=max_batch,
                             on_record=lambda rec, d=done_at, t=t_run: d.append(time.perf_counter() - t))
            stats = s.stats()
            stats.pop("per_suite", None)
            stats["max_batch"] = max_batch
            stats["done_at_s"] = [round(t, 2) for t in done_at]
            stats["steady_episodes_per_hour"] = steady_rate(done_at, n)
            stats["errors"] = sum(r["error"] is not None for r in s.records)
            report["runs"].append(stats)
            print(json.dumps(stats), flush=True)
            flush()
    report["finished"] = True
    flush()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
