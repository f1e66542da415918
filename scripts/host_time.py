#!/usr/bin/env python
"""Host-side time of one fast-path policy call: everything `Pi05Policy.raw_actions` does except the model.

    python scripts/host_time.py [--batches 1,7] [--calls 300] [--repeats 3] [--out host_time.json]

Two ways of preparing the same inputs, on synthetic LIBERO observations (224 px, the dummy policy: the host
work does not depend on the model's size):
  host_float  the fast path before the device-side conversion: images converted to float32 on the host
              (`prepare_inputs(..., "cpu")`), then compacted and padded (float32 copies);
  served      today's fast path (`Pi05Policy.raw_actions`): uint8 images compacted and padded on the host,
              converted where the model runs.
The model is replaced by a stub and the policy's device is `meta`, so no device work or copy is timed (the
copy to a GPU is not in these figures). Medians of `--calls` calls, each repeat reported; one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pytest_duquant.policies.pi05.modeling import compact_prefix  # noqa: E402
from pytest_duquant.policies.pi05.policy import batch_chunks, noise_for_seed, pad_rows  # noqa: E402
from pytest_duquant.policies.pi05.processing import prepare_inputs, synthetic_observations  # noqa: E402
from pytest_duquant.policies.session import random_policy  # noqa: E402


def host_float(policy, observations, seeds) -> None:
    """The former fast path's host work (float conversion first, then compaction and padding)."""
    inputs = prepare_inputs(list(observations), policy.config, policy.norm_stats, policy.tokenizer, "cpu")
    noise = torch.stack([noise_for_seed(s, policy.config.action_horizon, policy.config.action_dim) for s in seeds])
    for start, stop, size in batch_chunks(len(seeds), policy.batch_sizes):
        part = compact_prefix(**{k: v[start:stop] for k, v in inputs.items()}, token_bucket=policy.token_bucket)
        pad_rows(part, noise[start:stop], size)


def stub_policy():
    """The dummy policy on its fast path, its sampler a stub on the `meta` device (no model work, no copy)."""
    policy = random_policy("dummy", 0, "float32")
    policy.use_fast()
    policy.device = torch.device("meta")
    h, a = policy.config.action_horizon, policy.config.action_dim
    policy._sample = lambda noise, **_: torch.empty(noise.shape[0], h, a, device="meta")
    return policy


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,7", help="comma-separated batch sizes (default 1,7)")
    p.add_argument("--calls", type=int, default=300, help="calls per measurement (default 300)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per batch and way (default 3)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches {args.batches!r}: expected integers")
    if min(batches) < 1 or args.calls < 1 or args.repeats < 1:
        p.error("--batches, --calls and --repeats must be at least 1")
    torch.set_num_threads(1)
    policy = stub_policy()
    rows = []
    for b in batches:
        obs, seeds = synthetic_observations(b, seed=0, image_size=224), list(range(b))
        ways = {"host_float": lambda obs=obs, seeds=seeds: host_float(policy, obs, seeds),
                "served": lambda obs=obs, seeds=seeds: policy.raw_actions(obs, seeds)}
        for way, fn in ways.items():
            fn()  # warm-up
            ms = [round(median_ms(fn, args.calls), 3) for _ in range(args.repeats)]
            rows.append({"batch": b, "way": way, "median_ms": ms})
            print(f"batch {b:>3}  {way:<10}  " + "  ".join(f"{m:.3f}" for m in ms) + " ms", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "threads": 1, "calls": args.calls,
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
