#!/usr/bin/env python
"""Time one pi0.5 policy call (10 flow steps, prefix KV cache) and its peak memory; write JSON.

    python scripts/time_pi05.py --variant pi05 --dtype bfloat16 --devices cuda,cpu \
        --modes eager,compile,cudagraph,compile-cudagraph --batch 1 --out results/pi05_timing.json

Random weights (deterministic seed), no checkpoint, no network. Needs only torch + numpy (+ this repo on
sys.path); `sentencepiece` (optional) adds the full `policy.infer_batch` time (processing + model).
Modes: eager; compile = torch.compile(sample_actions, mode="max-autotune-no-cudagraphs") (CPU: default mode);
cudagraph = eager kernels captured in a CUDA graph; compile-cudagraph = torch.compile(mode="reduce-overhead").
A mode that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pytest_duquant.policies.pi05.configuration import variant_config  # noqa: E402
from pytest_duquant.policies.pi05.modeling import random_model  # noqa: E402
from pytest_duquant.policies.pi05.policy import GraphedSampler, noise_for_seed  # noqa: E402


def rss_peak_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        return None


def reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def model_inputs(config, batch: int, device) -> dict[str, torch.Tensor]:
    """Static-shape inputs as prepare_inputs() makes: 3 image slots (last masked), 20 valid prompt tokens."""
    gen = torch.Generator().manual_seed(0)
    n = len(config.image_keys)
    size = config.vision.image_size
    images = torch.rand((batch, n, 3, size, size), generator=gen) * 2 - 1
    masks = torch.tensor([config.image_present] * batch)
    tokens = torch.randint(4, min(config.vocab_size, 250_000), (batch, config.max_token_len), generator=gen)
    token_masks = torch.zeros(batch, config.max_token_len, dtype=torch.bool)
    token_masks[:, :20] = True
    tokens = torch.where(token_masks, tokens, torch.zeros_like(tokens))
    return {
        "images": images.to(device),
        "image_masks": masks.to(device),
        "tokens": tokens.to(device),
        "token_masks": token_masks.to(device),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device) -> None:
    """Drop what Python no longer references and, on CUDA, hand the cached blocks back (between measurements)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_fn(fn, device, warmup: int, reps: int) -> dict:
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "first_call_s": first,
        "median_ms": statistics.median(times) * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3,
        "reps": reps,
    }


def make_sampler(model, mode: str, device):
    if mode == "eager":
        return model.sample_actions
    if mode == "compile":
        cmode = "max-autotune-no-cudagraphs" if device.type == "cuda" else None
        return torch.compile(model.sample_actions, mode=cmode)
    if mode == "compile-cudagraph":
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        return torch.compile(model.sample_actions, mode="reduce-overhead")
    if mode == "cudagraph":
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        return GraphedSampler(model.sample_actions)
    raise ValueError(f"unknown mode {mode!r}")


def run_device(args, device: torch.device) -> dict:
    config = variant_config(args.variant)
    out: dict = {"device": str(device), "modes": {}}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)
    reset_rss_peak()
    t0 = time.perf_counter()
    model = random_model(config, seed=args.seed, precision=args.dtype, device=device).eval()
    out["build_s"] = time.perf_counter() - t0
    out["params"] = sum(p.numel() for p in model.parameters())
    out["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        out["weights_allocated_mb"] = torch.cuda.memory_allocated(device) / 2**20
    out["rss_after_build_mb"] = rss_peak_mb()
    inputs = model_inputs(config, args.batch, device)
    noise = torch.stack(
        [noise_for_seed(s, config.action_horizon, config.action_dim) for s in range(args.batch)]
    )
    noise = noise.to(device)
    reps = args.reps if device.type == "cuda" else args.cpu_reps
    warmup = args.warmup if device.type == "cuda" else 1
    reference = None
    for mode in args.modes:
        entry: dict = {}
        try:
            release(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            reset_rss_peak()
            sampler = make_sampler(model, mode, device)
            with torch.inference_mode():
                entry.update(time_fn(lambda s=sampler: s(noise=noise, **inputs), device, warmup, reps))
                actions = sampler(noise=noise, **inputs).float().clone()
            if reference is None:
                reference = actions
            entry["max_abs_diff_vs_first_mode"] = (actions - reference).abs().max().item()
            entry["finite"] = bool(torch.isfinite(actions).all())
            if device.type == "cuda":
                entry["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                entry["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
            entry["peak_rss_mb"] = rss_peak_mb()
        except Exception as exc:  # keep going: one failing mode must not lose the others
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc(limit=6)
        out["modes"][mode] = entry
        print(
            f"[{device}] {mode}: " + (entry.get("error") or f"median {entry['median_ms']:.1f} ms"), flush=True
        )
        torch._dynamo.reset()
    if args.policy_call:
        out["policy_call"] = time_policy_call(args, model, device)
    del model
    release(device)
    return out


def time_policy_call(args, model, device) -> dict:
    """Full Pi05Policy.infer_batch (resize, tokenize, model, unnormalize), eager, if sentencepiece exists."""
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return {"skipped": "sentencepiece not installed (model-only times above)"}
    from pytest_duquant.policies.pi05.checkpoint import random_norm_stats
    from pytest_duquant.policies.pi05.policy import Pi05Policy, _tokenizer
    from pytest_duquant.policies.pi05.processing import synthetic_observations

    policy = Pi05Policy(model, random_norm_stats(0), _tokenizer(None, None, model.config), device=device)
    obs = synthetic_observations(args.batch, seed=0)
    reps = args.reps if device.type == "cuda" else args.cpu_reps
    try:
        return time_fn(lambda: policy.infer_batch(obs, list(range(args.batch))), device, 1, reps)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="pi05", choices=("pi05", "dummy"))
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument(
        "--devices", default="cuda,cpu", help="comma list of cpu, cuda (cuda skipped when absent)"
    )
    ap.add_argument("--modes", default="eager,compile,cudagraph,compile-cudagraph")
    ap.add_argument("--cpu-modes", default="eager", help="modes run on CPU (compile on CPU is slow to build)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpu-reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-policy-call", dest="policy_call", action="store_false")
    ap.add_argument("--out", default="pi05_timing.json")
    args = ap.parse_args(argv)
    result = {
        "what": "pi0.5 sample_actions: prefix (3 image slots x 256 + 200 prompt tokens) once, 10 Euler steps",
        "variant": args.variant,
        "dtype": args.dtype,
        "batch": args.batch,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "devices": {},
    }
    torch.set_float32_matmul_precision("high")  # as openpi's PI0Pytorch
    for name in [d.strip() for d in args.devices.split(",") if d.strip()]:
        if name == "cuda" and not torch.cuda.is_available():
            result["devices"]["cuda"] = {"skipped": "no CUDA device"}
            continue
        dev_args = argparse.Namespace(**vars(args))
        dev_args.modes = [
            m.strip() for m in (args.modes if name == "cuda" else args.cpu_modes).split(",") if m.strip()
        ]
        result["devices"][name] = run_device(dev_args, torch.device(name))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # partial results survive a crash
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
