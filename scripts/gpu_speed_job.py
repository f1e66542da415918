#!/usr/bin/env python
"""Issue 14's measurements in one run: where a pi0.5 call's time goes, the reference vs the fast path (eager and
CUDA-graphed), W4A8 (presets A and B, Triton backend) against the fast bf16 call, the policy's allocated memory
before/after quantization, and LIBERO-free policy calls per second. Writes one JSON (docs/speed.md).

    python scripts/gpu_speed_job.py --out $OUT/gpu_speed.json               # H200: full pi05, bf16, random weights
    python scripts/gpu_speed_job.py --device cpu --variant dummy --quick    # the CPU smoke run CI makes

Every stage runs in its own try/except (an error is recorded under "errors" with its traceback and the next
stage runs) and the JSON is rewritten after each stage, so a run cut by a time limit keeps what it measured.
Random weights (drawn on the device for the full model: timings do not depend on the values), no checkpoint,
no network. CPU: the CUDA-graph and CUDA-memory measurements are recorded as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # time_pi05: the shared timer

import torch  # noqa: E402
from time_pi05 import release, sync, time_fn  # noqa: E402
from torch import nn  # noqa: E402

from pytest_duquant.policies.pi05 import modeling  # noqa: E402
from pytest_duquant.policies.pi05.configuration import variant_config  # noqa: E402
from pytest_duquant.policies.pi05.modeling import (  # noqa: E402
    attention,
    compact_prefix,
    fused_attention,
    short_query_attention,
)
from pytest_duquant.policies.pi05.policy import GraphedSampler, noise_for_seed  # noqa: E402

SKIPPED_NO_CUDA = "skipped: needs CUDA"


# ---- the record -------------------------------------------------------------------------------------------
class Record:
    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "stages": {}, "errors": {}, "stage_seconds": {}}
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default))
        os.replace(tmp, self.path)

    def stage(self, name: str, fn, *args, **kwargs):
        """Run one stage: its result (a dict) or its error is recorded, then the file is rewritten."""
        t0 = time.perf_counter()
        print(f"[gpu_speed_job] {name} ...", flush=True)
        try:
            out = fn(*args, **kwargs)
            self.data["stages"][name] = out
        except Exception as exc:  # noqa: BLE001 - recorded, the next stage still runs
            out = None
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            print(f"[gpu_speed_job] {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
        self.data["stage_seconds"][name] = round(time.perf_counter() - t0, 3)
        self.flush()
        return out


def _json_default(x):
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return repr(x)


# ---- helpers ----------------------------------------------------------------------------------------------
def model_inputs(config, batch: int, device, valid_tokens: int = 20) -> dict[str, torch.Tensor]:
    """Inputs as prepare_inputs() makes them for LIBERO: the config's image slots (pi05: 3, the last masked) and a
    prompt of `valid_tokens` tokens padded to max_token_len."""
    gen = torch.Generator().manual_seed(0)
    n, size = len(config.image_keys), config.vision.image_size
    images = torch.rand((batch, n, 3, size, size), generator=gen) * 2 - 1
    masks = torch.tensor([list(config.image_present)] * batch)
    tokens = torch.randint(4, min(config.vocab_size, 250_000), (batch, config.max_token_len), generator=gen)
    token_masks = torch.zeros(batch, config.max_token_len, dtype=torch.bool)
    token_masks[:, :valid_tokens] = True
    tokens = torch.where(token_masks, tokens, torch.zeros_like(tokens))
    return {"images": images.to(device), "image_masks": masks.to(device), "tokens": tokens.to(device),
            "token_masks": token_masks.to(device)}


def noise(config, batch: int, device) -> torch.Tensor:
    return torch.stack([noise_for_seed(s, config.action_horizon, config.action_dim) for s in range(batch)]).to(device)


def compacted(inputs: dict) -> dict:
    dev = inputs["images"].device
    return {k: v.to(dev) for k, v in compact_prefix(**{k: v.cpu() for k, v in inputs.items()}).items()}


def build(args, device: torch.device):
    config = variant_config(args.variant)
    # drawn on the GPU (seconds; timing needs no fingerprint), deterministically on a CPU
    model = modeling.random_model(config, args.seed, args.dtype, device=device, draw_on_device=device.type == "cuda")
    return config, model.eval()


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer (the module's own tensors, wherever they are)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def allocated(device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def sampler(fn, mode: str, device):
    if mode == "eager":
        return fn
    if mode == "graph":
        if device.type != "cuda":
            return None
        return GraphedSampler(fn)
    raise ValueError(mode)


# ---- stages -----------------------------------------------------------------------------------------------
def stage_build(args, device, state) -> dict:
    before = allocated(device)
    t0 = time.perf_counter()
    config, model = build(args, device)
    sync(device)
    state["config"], state["model"] = config, model
    return {"variant": args.variant, "dtype": args.dtype, "build_s": round(time.perf_counter() - t0, 2),
            "memory_allocated_bytes": None if before is None else allocated(device) - before,
            "tensor_bytes": tensor_bytes(model), "parameters": sum(p.numel() for p in model.parameters())}


def stage_sdpa_backends(args, device, state) -> dict:
    """Which fused-attention kernel takes our shapes (an additive mask, head_dim, one KV head folded) and its
    time, for the prefix's and the expert's attention at batch 1."""
    if device.type != "cuda":
        return {"skipped": SKIPPED_NO_CUDA}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config, dtype = state["config"], state["model"].compute_dtype
    spec, p = config.vlm, 2 * config.vision.num_patches + 32
    shapes = {"prefix": (spec.num_heads * p, p), "expert": (spec.num_heads * config.action_horizon, p + 10)}
    out = {}
    for name, (t, s) in shapes.items():
        q = torch.randn(1, 1, t, spec.head_dim, device=device, dtype=dtype)
        k = torch.randn(1, 1, s, spec.head_dim, device=device, dtype=dtype)
        mask = torch.zeros(1, 1, t, s, device=device, dtype=dtype)
        res = {}
        for be in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            try:
                with sdpa_kernel(getattr(SDPBackend, be)):
                    res[be] = time_fn(
                        lambda q=q, k=k, mask=mask: torch.nn.functional.scaled_dot_product_attention(
                            q, k, k, attn_mask=mask), device, 3, 20)["median_ms"]
            except Exception as exc:  # noqa: BLE001
                res[be] = f"unavailable: {type(exc).__name__}: {str(exc)[:200]}"
        out[name] = {"q_len": t, "kv_len": s, "ms": res}
    return out


def _roles(model) -> dict[nn.Module, str]:
    """Module -> role for the profile; no role contains another (exclusive times add up)."""
    roles = {}
    for name, m in model.named_modules():
        cls = type(m).__name__
        side = "expert" if "gemma_expert" in name else "lm"
        if cls == "SiglipEncoderLayer":
            roles[m] = "vision.layers"
        elif cls in ("SiglipVisionEmbeddings",):
            roles[m] = "vision.embeddings"
        elif name.endswith("post_layernorm") or name.endswith("multi_modal_projector"):
            roles[m] = "vision.post_ln+projector"
        elif cls == "Embedding" and "embed_tokens" in name:
            roles[m] = "lm.embed_tokens"
        elif cls == "GemmaMLP":
            roles[m] = f"{side}.mlp"
        elif cls == "GemmaRMSNorm":
            roles[m] = f"{side}.norms" + ("(adaRMS dense incl.)" if side == "expert" else "")
        elif name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") and "vision" not in name:
            roles[m] = f"{side}.qkvo_proj"
        elif name in ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"):
            roles[m] = "heads(action/time)"
    return roles


def profile_call(model, fn, device) -> dict:
    """Per-role device time (CPU time on a CPU) of one eager call under torch.profiler, the kernel count and the
    top kernels. 'other' = the call's kernel time outside every role (RoPE, masks, residuals, casts, cat, the
    fast path's precomputed modulations)."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    roles = _roles(model)
    stacks: dict[int, list] = {}
    handles = []

    def pre(m, _inp):
        rf = record_function(f"role::{roles[m]}")
        rf.__enter__()
        stacks.setdefault(id(m), []).append(rf)

    def post(m, _inp, _out):
        stacks[id(m)].pop().__exit__(None, None, None)

    for m in roles:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    pwe = model.paligemma_with_expert
    orig_run = pwe.run_layers

    def run_layers(xs, *a, attn_fn=modeling.attention, **kw):
        side = "lm" if xs[0] is not None else "expert"

        def timed(*aa):
            with record_function(f"role::{side}.attention"):
                return attn_fn(*aa)

        return orig_run(xs, *a, attn_fn=timed, **kw)

    pwe.run_layers = run_layers
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        fn()
        sync(device)
        with profile(activities=acts) as prof:
            fn()
            sync(device)
    finally:
        del pwe.run_layers
        for h in handles:
            h.remove()
    on_gpu = device.type == "cuda"

    def dev_total(e):
        for attr in (("device_time_total", "cuda_time_total") if on_gpu else ("cpu_time_total",)):
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    def dev_self(e):
        for attr in (("self_device_time_total", "self_cuda_time_total") if on_gpu else ("self_cpu_time_total",)):
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    by_role: dict[str, float] = {}
    for e in prof.events():  # the CPU-side ranges: their device time is the kernels launched inside them
        if e.name.startswith("role::") and str(getattr(e, "device_type", "CPU")).endswith("CPU"):
            role = e.name[len("role::"):]
            by_role[role] = by_role.get(role, 0.0) + dev_total(e) / 1e3
    by_role = {k: round(v, 3) for k, v in by_role.items()}
    avg = prof.key_averages()
    kernels = [e for e in avg if not e.key.startswith("role::")]
    if on_gpu:  # kernels are the events with device time of their own and no CPU time
        kernels = [e for e in kernels if dev_self(e) > 0 and getattr(e, "self_cpu_time_total", 0) == 0]
    total_ms = sum(dev_self(e) for e in kernels) / 1e3
    top = sorted(kernels, key=dev_self, reverse=True)[:25]
    return {
        "unit": "ms of device time" if on_gpu else "ms of CPU time",
        "total_ms": round(total_ms, 3),
        "by_role_ms": by_role,
        "other_ms": round(total_ms - sum(by_role.values()), 3),
        "kernel_launches": int(sum(e.count for e in kernels)) if on_gpu else None,
        "top_kernels": [{"name": e.key[:120], "ms": round(dev_self(e) / 1e3, 3), "count": e.count} for e in top],
    }


def stage_profile(args, device, state) -> dict:
    config, model = state["config"], state["model"]
    inp, nz = model_inputs(config, 1, device), noise(config, 1, device)
    small = compacted(inp)
    out = {}
    calls = [("reference", lambda: model.sample_actions(noise=nz, **inp)),
             ("fast", lambda: model.sample_actions_fast(noise=nz, **small))]
    if device.type == "cuda":  # the "after" profile: compiled step and prefix, short-query attention
        def compiled():
            return model.sample_actions_fast(noise=nz, step_attn_fn=short_query_attention, **small)

        calls.append(("fast_compiled_short_query", compiled))
    for name, call in calls:
        try:
            if name.startswith("fast_compiled"):
                model.compile_fast_step(prefix=True)
                call()  # compile (or reuse the compiled stage's code) before profiling
            out[name] = profile_call(model, call, device)
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            model.compile_fast_step(False)
    return out


def stage_components(args, device, state) -> dict:
    """Graphed (eager on a CPU) time of the vision tower, the prefix (vision + language model K/V) and the whole
    call, fast path, batch 1: expert = whole - prefix."""
    config, model = state["config"], state["model"]
    inp = compacted(model_inputs(config, 1, device))
    nz = noise(config, 1, device)
    pwe = model.paligemma_with_expert

    @torch.no_grad()
    def vision(images):
        return torch.stack([pwe.embed_image(images[:, i], model.compute_dtype) for i in range(images.shape[1])])

    @torch.no_grad()
    def prefix(images, image_masks, tokens, token_masks):
        return model.fast_prefix(images, image_masks, tokens, token_masks)[0][-1][0]

    mode = "graph" if device.type == "cuda" else "eager"
    out = {"mode": mode}
    for name, fn, kw in (("vision", vision, {"images": inp["images"]}), ("prefix", prefix, inp),
                         ("whole_call", model.sample_actions_fast, {**inp, "noise": nz})):
        s = sampler(fn, mode, device)
        out[name] = time_fn(lambda s=s, kw=kw: s(**kw), device, args.warmup, args.reps)["median_ms"]
    out["expert_10_steps"] = out["whole_call"] - out["prefix"]
    return out


def stage_calls(args, device, state) -> dict:
    """Reference vs fast, eager and graphed, per batch size; plus how far the fast output is from the reference's
    (same noise) and the graphed from the eager one."""
    config, model = state["config"], state["model"]
    out = {}
    for b in args.batches:
        inp, nz = model_inputs(config, b, device), noise(config, b, device)
        small = compacted(inp)
        row = {}
        outputs = {}
        short = functools.partial(model.sample_actions_fast, step_attn_fn=short_query_attention)
        for path, fn, kw in (("reference", model.sample_actions, inp), ("fast", model.sample_actions_fast, small),
                             ("fast_short_query", short, small)):
            for mode in ("eager", "graph"):
                key = f"{path}_{mode}"
                s = sampler(fn, mode, device)
                if s is None:
                    row[key] = SKIPPED_NO_CUDA
                    continue
                try:
                    row[key] = time_fn(lambda s=s, kw=kw, nz=nz: s(noise=nz, **kw), device, args.warmup, args.reps)
                    outputs[key] = s(noise=nz, **kw).float()
                except Exception as exc:  # noqa: BLE001
                    row[key] = {"error": f"{type(exc).__name__}: {exc}"}
                del s
                gc.collect()
        ref = outputs.get("reference_eager")
        for key, val in outputs.items():
            if ref is not None and key != "reference_eager":
                row[f"max_abs_diff_{key}_vs_reference_eager"] = float((val - ref).abs().max())
        if "reference_eager" in outputs:
            row["max_abs_action"] = float(ref.abs().max())
        for key in ("reference_graph", "fast_eager", "fast_graph", "fast_short_query_graph"):
            if isinstance(row.get(key), dict) and "median_ms" in row[key] and "median_ms" in row["reference_eager"]:
                row[f"speedup_{key}_vs_reference_eager"] = row["reference_eager"]["median_ms"] / row[key]["median_ms"]
        if all(isinstance(row.get(k), dict) and "median_ms" in row[k] for k in ("reference_graph", "fast_graph")):
            row["speedup_fast_graph_vs_reference_graph"] = (
                row["reference_graph"]["median_ms"] / row["fast_graph"]["median_ms"])
        out[f"b{b}"] = row
        pair = ("fast_graph", "fast_short_query_graph")
        if all(isinstance(row.get(k), dict) and "median_ms" in row[k] for k in pair):
            row["speedup_fast_short_query_graph_vs_fast_graph"] = (
                row["fast_graph"]["median_ms"] / row["fast_short_query_graph"]["median_ms"])
        state.setdefault("fast_ms", {})[b] = {
            m: row[f"fast_{m}"]["median_ms"] for m in ("eager", "graph")
            if isinstance(row.get(f"fast_{m}"), dict) and "median_ms" in row[f"fast_{m}"]}
    return out


LM_AND_EXPERT = {"scope": "paligemma_with_expert.",
                 "exclude": r"(?:^|\.)(norm|ln|layernorm|emb)(?:\.|$)|vision_tower"}


def stage_quantized(args, device, state, preset: str, where: dict | None = None) -> dict:
    """W4A8 of the expert's 126 linears (dynamic activations, Triton backend where it runs), on a copy of the
    model: allocated memory before/after and the fast call, as ratios to the fast bf16 call. `where`
    (scope/exclude overrides) widens it, e.g. to the language model + expert (QuantVLA's setting)."""
    from pytest_duquant.config import from_env, replace
    from pytest_duquant.kernels import grouping
    from pytest_duquant.quantize import quantize_model

    config, model = state["config"], state["model"]
    release(device)
    base = allocated(device)
    qmodel = copy.deepcopy(model)
    copied = allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    qc = replace(from_env({}, preset=preset), packdir=str(Path(args.packdir) / preset),
                 backend="triton", act_dynamic=True, **(where or {}))
    t0 = time.perf_counter()
    report = quantize_model(qmodel, qc)
    sync(device)
    out = {"config": {"preset": preset, "backend": "triton", "act_dynamic": True, **(where or {})},
           "quantize_s": round(time.perf_counter() - t0, 2), "layers": len(getattr(report, "layers", []) or []),
           "tensor_bytes_fp": tensor_bytes(model), "tensor_bytes_quantized": tensor_bytes(qmodel)}
    for attr in ("bytes_before", "bytes_after", "packed_bytes"):
        if hasattr(report, attr):
            out[f"report_{attr}"] = getattr(report, attr)
    if base is not None:
        after = allocated(device)
        out["memory_allocated_policy_bf16_bytes"] = copied - base
        out["memory_allocated_policy_quantized_bytes"] = after - base
        out["memory_allocated_saved_bytes"] = (copied - base) - (after - base)
        out["memory_peak_during_quantize_bytes"] = torch.cuda.max_memory_allocated(device) - base
    # the deployed form (pytest_duquant.deploy): packed codes, scales, transforms; no float/int8 weight copy.
    # Everything below (timings too) runs on the deployed model.
    from pytest_duquant.deploy import deploy_model, resident_bytes

    out["deployed_layers"] = deploy_model(qmodel)
    release(device)
    out["resident_bytes_deployed"] = resident_bytes(qmodel).to_dict()
    out["tensor_bytes_deployed"] = tensor_bytes(qmodel)
    if base is not None:
        deployed = allocated(device)
        out["memory_allocated_policy_deployed_bytes"] = deployed - base
        out["memory_allocated_saved_deployed_bytes"] = (copied - base) - (deployed - base)
    fast_ms = state.get("fast_ms", {})
    for b in args.batches:
        inp, nz = compacted(model_inputs(config, b, device)), noise(config, b, device)
        row = {}
        for mode in ("eager", "graph"):
            s = sampler(qmodel.sample_actions_fast, mode, device)
            if s is None:
                row[mode] = SKIPPED_NO_CUDA
                continue
            try:
                t = time_fn(lambda s=s, nz=nz, inp=inp: s(noise=nz, **inp), device, args.warmup, args.reps)
                row[mode] = t
                ref = fast_ms.get(b, {}).get(mode)
                if ref:
                    row[f"ratio_to_fast_bf16_{mode}"] = t["median_ms"] / ref
            except Exception as exc:  # noqa: BLE001
                row[mode] = {"error": f"{type(exc).__name__}: {exc}"}
            del s
        if device.type == "cuda":
            graph_ref = fast_ms.get(b, {}).get("graph")
            timed = functools.partial(_time_graphed, row, qmodel.sample_actions_fast, dict(noise=nz, **inp),
                                      device, args)
            # the GeGLU prologue on the model path, with groups up to 256 tokens (grouping.geglu_mlp_forward)
            with _grouping(geglu=True, max_m=256):
                timed("graph_fused", graph_ref, "ratio_to_fast_bf16_graph_fused")
            if b * config.action_horizon > grouping.GROUP_MAX_M:
                # sibling groups above SMALL_M tokens (the expert at batch 8 = 80 tokens): do they pay there?
                with _grouping(max_m=256):
                    timed("graph_groups_to_256", graph_ref, "ratio_to_fast_bf16_graph_groups_to_256")
            if args.compile_quantized:
                # the Euler step compiled around the W4A8 kernels, then graphed: compile_fast_step prepares every
                # quantized layer's pack, and the traced step calls them as torch.library custom ops
                # (pytest_duquant.kernels.ops: duquant::w4a8_linear, q/k/v and gate/up as duquant::w4a8_group);
                # the graph breaks and graphs dynamo counted say whether the step really traced as one graph
                from torch._dynamo.utils import counters

                torch._dynamo.reset()  # a fresh cache: earlier models' entries must not hit the recompile limit
                counters.clear()
                row["compiled_op_layers"] = qmodel.compile_fast_step()
                try:
                    timed("compiled_graph", fast_ms.get(b, {}).get("compiled_graph") or graph_ref,
                          "ratio_to_best_bf16_graph")
                finally:
                    qmodel.compile_fast_step(False)
                row["compiled_graph_breaks"] = sum(counters["graph_break"].values())
                row["compiled_unique_graphs"] = counters["stats"]["unique_graphs"]
        out[f"b{b}"] = row
    del qmodel
    release(device)
    return out


def _time_graphed(row: dict, fn, kwargs: dict, device, args, key: str, ref_ms, ratio_key: str) -> None:
    """row[key] = the graphed timing of fn(**kwargs) (or its error), row[ratio_key] = its ratio to ref_ms."""
    try:
        s = sampler(fn, "graph", device)
        t = time_fn(lambda: s(**kwargs), device, args.warmup, args.reps)
        row[key] = t
        if ref_ms:
            row[ratio_key] = t["median_ms"] / ref_ms
    except Exception as exc:  # noqa: BLE001
        row[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}


@contextlib.contextmanager
def _grouping(*, geglu: bool | None = None, max_m: int | None = None):
    """The kernel grouping knobs (grouping.GEGLU_PROLOGUE, GROUP_MAX_M) set for a measurement, then restored."""
    from pytest_duquant.kernels import grouping

    saved = grouping.GEGLU_PROLOGUE, grouping.GROUP_MAX_M
    if geglu is not None:
        grouping.GEGLU_PROLOGUE = geglu
    if max_m is not None:
        grouping.GROUP_MAX_M = max_m
    try:
        yield
    finally:
        grouping.GEGLU_PROLOGUE, grouping.GROUP_MAX_M = saved


def stage_compiled(args, device, state) -> dict:
    """The fast path with its Euler step torch.compiled (inductor fuses the step's elementwise work: the graphed
    bf16 call is kernel-count bound, docs/speed.md), CUDA-graphed; with the fused (SDPA) attention and with the
    eager softmax attention (which inductor can fuse) in the steps, per --compile-attn; with the fused q/k/v and
    gate/up GEMMs and/or the steps' K/V buffer, per --compile-fusion (rows keyed ``{attn}_{fusion}``, plain
    ``{attn}`` for 'none'). Compile time, ms, ratio to the fast graph, difference from the uncompiled fast call
    (with the same options)."""
    if device.type != "cuda":  # inductor on a CPU needs a C++ compiler and says nothing about a GPU
        return {"skipped": SKIPPED_NO_CUDA}
    config, model = state["config"], state["model"]
    out = {}
    fast_ms = state.setdefault("fast_ms", {})
    for label, fusion, scope in itertools.product(args.compile_attn.split(","), args.compile_fusion.split(","),
                                                  args.compile_scopes.split(",")):
        attn, prefix = COMPILE_ATTN[label], scope == "all"
        fused, kv_buffer = COMPILE_FUSION[fusion]
        torch._dynamo.reset()
        model.fuse_fast_projections(fused)
        model.compile_fast_step(prefix=prefix)
        try:
            for b in args.batches:
                inp, nz = compacted(model_inputs(config, b, device)), noise(config, b, device)
                fn = functools.partial(model.sample_actions_fast, step_attn_fn=attn, kv_buffer=kv_buffer)
                row = {}
                s = sampler(fn, "graph" if device.type == "cuda" else "eager", device)
                t0 = time.perf_counter()
                first = s(noise=nz, **inp)
                sync(device)
                row["first_call_s"] = round(time.perf_counter() - t0, 2)  # compile (+ capture)
                row["timing"] = time_fn(lambda s=s, nz=nz, inp=inp: s(noise=nz, **inp), device, args.warmup, args.reps)
                model.compile_fast_step(False)
                plain = model.sample_actions_fast(noise=nz, step_attn_fn=attn, kv_buffer=kv_buffer, **inp)
                model.compile_fast_step(prefix=prefix)
                row["max_abs_diff_vs_fast_eager"] = float((first.float() - plain.float()).abs().max())
                ref = fast_ms.get(b, {}).get("graph")
                if ref:
                    row["ratio_to_fast_graph"] = row["timing"]["median_ms"] / ref
                best = fast_ms.setdefault(b, {}).get("compiled_graph")
                if best is None or row["timing"]["median_ms"] < best:
                    fast_ms[b]["compiled_graph"] = row["timing"]["median_ms"]
                key = label if fusion == "none" else f"{label}_{fusion}"
                out[f"{key}{'_all' if prefix else ''}_b{b}"] = row
                del s
        finally:
            model.compile_fast_step(False)
            model.fuse_fast_projections(False)  # the later stages time the model as built
    return out


def stage_policy_calls(args, device, state) -> dict:
    """LIBERO-free: Pi05Policy.infer_batch (processing + model) on synthetic LIBERO observations, fast path
    (graphed on CUDA) vs the reference path (eager), calls and observations per second."""
    from pytest_duquant.policies.pi05.checkpoint import random_norm_stats
    from pytest_duquant.policies.pi05.policy import Pi05Policy, _tokenizer
    from pytest_duquant.policies.pi05.processing import synthetic_observations

    config, model = state["config"], state["model"]
    tok = _tokenizer(None, None, config)
    out = {}
    for label, fast in (("reference_eager", False), ("fast_served", True)):
        policy = Pi05Policy(model, random_norm_stats(0), tok, device=device)
        if fast:
            policy.serve_fast()
        out[label] = {"mode": policy.mode}
        for b in args.batches:
            obs = synthetic_observations(b, seed=b)
            seeds = list(range(b))
            policy.infer_batch(obs, seeds)  # capture / warm up
            n, t0 = 0, time.perf_counter()
            while n < args.policy_calls or time.perf_counter() - t0 < args.policy_seconds:
                policy.infer_batch(obs, seeds)
                n += 1
                if n >= 10 * args.policy_calls:
                    break
            dt = time.perf_counter() - t0
            out[label][f"b{b}"] = {"calls": n, "calls_per_s": n / dt, "observations_per_s": n * b / dt,
                                   "ms_per_call": 1e3 * dt / n}
    return out


def stage_gpu_tests(args, device, state) -> dict:
    """The GPU-only tests of the fast path (graphed == eager, compiled, device-side inputs) and of the kernels'
    model paths (large-M groups, GeGLU prologue, custom ops), run by pytest in a subprocess."""
    if device.type != "cuda":
        return {"skipped": SKIPPED_NO_CUDA}
    import subprocess

    from pytest_duquant.testing import pytest_plugin_args

    root = Path(__file__).resolve().parents[1]
    # the plugin registers the markers; on the device the checkout is on PYTHONPATH, not installed
    cmd = [sys.executable, "-m", "pytest", *pytest_plugin_args(), "tests/policies/test_fast.py",
           "tests/policies/test_fast_inputs.py", "tests/kernels/test_triton_kernels.py",
           "-k", "on_gpu or large_m_group or geglu_model_path or custom_ops_on_gpu or cuda_fast_path", "-q",
           "-rfEs", "--tb=short", "-p", "no:logging", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=args.test_timeout)
    text = proc.stdout + proc.stderr
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "failed": failed_tests(text),
            "tail": text[-8000:]}


def failed_tests(pytest_output: str) -> list[str]:
    """The test ids pytest's short summary (-rfE) lists as FAILED or ERROR."""
    return [line.split(" ", 1)[1].split(" - ", 1)[0] for line in pytest_output.splitlines()
            if line.startswith(("FAILED ", "ERROR "))]


# ---- main -------------------------------------------------------------------------------------------------
# the compiled stage's attention variants for the denoising steps
COMPILE_ATTN = {"short_query": short_query_attention, "sdpa": fused_attention, "eager_softmax": attention}
# ... and its launch-saving options: (Pi05Model.fuse_fast_projections, sample_actions_fast(kv_buffer=...))
COMPILE_FUSION = {"none": (False, False), "fused": (True, False), "kvbuf": (False, True), "fused_kvbuf": (True, True)}
STAGES = {"build": stage_build, "sdpa_backends": stage_sdpa_backends, "profile": stage_profile,
          "components": stage_components, "calls": stage_calls, "compiled": stage_compiled,
          "quantized": stage_quantized, "quantized_lm": stage_quantized, "policy_calls": stage_policy_calls,
          "gpu_tests": stage_gpu_tests}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", default="pi05", choices=("pi05", "dummy", "reference"))
    ap.add_argument("--dtype", default=None, help="bfloat16 (default for pi05) or float32 (default otherwise)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; --quick: 1,2)")
    ap.add_argument("--presets", default="A,B")
    ap.add_argument("--lm-presets", default="B", help="presets for the quantized_lm stage (LM + expert)")
    ap.add_argument("--stages",
                    default="build,calls,quantized,compiled,gpu_tests,profile,components,policy_calls,quantized_lm,"
                    "sdpa_backends")
    ap.add_argument("--compile-attn", default="short_query",
                    help="compiled stage: the steps' attention variants (short_query, sdpa, eager_softmax)")
    ap.add_argument("--compile-fusion", default="none",
                    help="compiled stage: none, fused (one GEMM for q/k/v and for gate/up), kvbuf (the steps' "
                    "preallocated K/V buffer), fused_kvbuf; e.g. none,fused,kvbuf,fused_kvbuf (a compile each)")
    ap.add_argument("--compile-scopes", default="step,all",
                    help="compiled stage: 'step' (the Euler step compiled) and/or 'all' (the prefix too)")
    ap.add_argument("--compile-quantized", action="store_true",
                    help="quantized stages: also time the compiled step around the W4A8 kernels (a compile each)")
    ap.add_argument("--test-timeout", type=int, default=240, help="seconds for the gpu_tests stage")
    ap.add_argument("--quick", action="store_true", help="few repetitions, small batches: a smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_speed.json, else ./gpu_speed.json)")
    ap.add_argument("--packdir", default=None, help="pack cache (default: a temporary folder)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.compile_attn.split(",")) - set(COMPILE_ATTN))
    if unknown:
        ap.error(f"--compile-attn: unknown {', '.join(unknown)}; known: {', '.join(COMPILE_ATTN)}")
    unknown = sorted(set(args.compile_fusion.split(",")) - set(COMPILE_FUSION))
    if unknown:
        ap.error(f"--compile-fusion: unknown {', '.join(unknown)}; known: {', '.join(COMPILE_FUSION)}")
    if set(args.compile_scopes.split(",")) - {"step", "all"}:
        ap.error(f"--compile-scopes {args.compile_scopes!r}: 'step', 'all' or 'step,all'")
    args.dtype = args.dtype or ("bfloat16" if args.variant == "pi05" else "float32")
    args.batches = [int(b) for b in (args.batches or ("1,2" if args.quick else "1,8")).split(",")]
    args.warmup, args.reps = (1, 2) if args.quick else (3, 10)
    args.policy_calls, args.policy_seconds = (2, 0.0) if args.quick else (10, 5.0)
    if args.out is None:
        args.out = str(Path(os.environ.get("OUT", ".")) / "gpu_speed.json")
    return args


def meta(args, device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:], "device": str(device), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node(), "cpu_count": os.cpu_count(),
            "variant": args.variant, "dtype": args.dtype, "batches": args.batches, "quick": args.quick}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    tmp = tempfile.TemporaryDirectory(prefix="dq-speed-packs-")
    args.packdir = args.packdir or tmp.name
    rec = Record(Path(args.out), meta(args, device))
    state: dict = {}
    wanted = [w.strip() for w in args.stages.split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        print(f"--stages: unknown {', '.join(unknown)}; known: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    rec.stage("build", stage_build, args, device, state)
    if "model" not in state:
        return 1
    for name in wanted:  # in the order given: the most wanted first, so a time limit cuts the least wanted
        if name == "build":
            continue
        if name == "quantized":
            for preset in args.presets.split(","):
                rec.stage(f"quantized_{preset}", stage_quantized, args, device, state, preset)
        elif name == "quantized_lm":
            for preset in args.lm_presets.split(","):
                rec.stage(f"quantized_lm_{preset}", stage_quantized, args, device, state, preset, LM_AND_EXPERT)
        elif name == "gpu_tests":  # its own process and small models: the full model may stay resident
            rec.stage("gpu_tests", stage_gpu_tests, args, device, state)
        elif "model" in state:
            rec.stage(name, STAGES[name], args, device, state)
    rec.data["finished"] = True
    rec.flush()
    tmp.cleanup()
    print(f"[gpu_speed_job] wrote {args.out} ({len(rec.data['errors'])} stage errors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
