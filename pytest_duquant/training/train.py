"""Train a pi0.5-family policy from scratch on demonstrations (flow matching), and save it in openpi's layout.

``train(TrainSettings(...))`` does it all: loads the demonstrations (``pytest_duquant.libero.demos``
format), computes quantile norm stats from them, trains a SentencePiece vocabulary on their prompts,
tokenizes every frame's prompt + normalized state exactly as the policy will at inference, trains
the model with the flow-matching loss (AdamW, warmup + cosine, gradient clipping, an EMA of the
weights, bf16 autocast on CUDA, image augmentation on the device), and writes a checkpoint that
``--ckpt`` loads like any other (``model.safetensors``, ``config.json``, ``assets/.../norm_stats.json``,
``tokenizer.model``) plus ``train_log.json`` (settings, data provenance, loss curve, device, versions,
time) and ``loss.png``. A run interrupted by a deadline or a kill resumes from ``train_state.pt``.

Several GPUs: start it under ``torchrun --nproc_per_node N`` (``duquant train --gpus N`` does this
itself): one process per GPU, DistributedDataParallel, ``batch`` samples per GPU, rank 0 writes.
A time budget (``max_minutes``) counts training time over all resumed runs, so the LR schedule continues
where it stopped; ``stop_after_minutes`` ends one run early (state and an interim checkpoint kept).

Seeded: the init, the batch order, the noise and the augmentation draw from generators seeded by
``seed``. On a GPU, kernels with atomics make runs close but not bitwise equal.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pytest_duquant.libero.demos import demo_files, read_manifest
from pytest_duquant.libero.policy import CKPT_CALIBRATION
from pytest_duquant.policies.pi05.checkpoint import save_checkpoint
from pytest_duquant.policies.pi05.configuration import variant_config
from pytest_duquant.policies.pi05.modeling import attention, random_model
from pytest_duquant.policies.pi05.tokenizer import PaligemmaTokenizer
from pytest_duquant.training.data import (
    load_demo_arrays,
    normalize_actions,
    prompt_tokens,
    quantile_norm_stats,
)
from pytest_duquant.training.flow import FlowMatchingLoss, fused_attention
from pytest_duquant.training.tokenizer import write_prompt_tokenizer

STATE_FILE = "train_state.pt"
CALIB_FILE = CKPT_CALIBRATION  # real policy inputs shipped with the checkpoint (libero/calibration.py reads it)
LOG_FILE = "train_log.json"


@dataclass
class TrainSettings:
    demos: str
    out: str
    variant: str = "reference"
    steps: int = 6000
    batch: int = 128
    lr: float = 3e-4
    warmup: int = 300
    weight_decay: float = 1e-4
    ema: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cuda"
    max_minutes: float | None = None  # training time over all runs (data loading excluded); LR decays over it
    stop_after_minutes: float | None = None  # end this run after this long, resumable (a device call's limit)
    fused_attention: bool = True  # scaled_dot_product_attention in training (the served policy runs eager)
    holdout_trials: tuple[int, ...] = ()
    augment: bool = True
    log_every: int = 50
    save_every: int = 1000
    extra: dict = field(default_factory=dict)


def write_calibration(arrays, path: Path, n: int = 16, seed: int = 0) -> Path:
    """`n` training frames as calibration observations: the first frame (= a rollout's first query) of
    one episode per prompt, then frames drawn uniformly (seeded)."""
    firsts = [int(np.flatnonzero(arrays.prompt_id == p)[0]) for p in range(len(arrays.prompts))]
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(np.arange(len(arrays)), firsts)
    rest = rng.choice(others, size=min(len(others), max(0, n - len(firsts))), replace=False).tolist()
    idx = (firsts + rest)[:n]
    np.savez_compressed(
        path, image=arrays.image[idx], wrist_image=arrays.wrist_image[idx], state=arrays.state[idx],
        prompt=np.array([arrays.prompts[arrays.prompt_id[i]] for i in idx]),
    )
    return path


def lr_at(step: int, s: TrainSettings, time_fraction: float = 0.0) -> float:
    """Linear warmup, then cosine decay to 5 % over the run: its steps, or its time budget (max_minutes)
    when that ends first (``time_fraction`` = elapsed / budget)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = max((step - s.warmup) / max(1, s.steps - s.warmup), time_fraction)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def augment_images(x: torch.Tensor, gen: torch.Generator, rotate_deg: float) -> torch.Tensor:
    """x float [B, 3, H, W] in [-1, 1]: random crop-and-resize (90-100 %), small rotation, brightness and
    contrast jitter (openpi augments LIBERO images the same way: crop 95 %, rotate +-5 deg, color)."""
    b = x.shape[0]
    dev = x.device

    def u(lo, hi):
        return (torch.rand(b, generator=gen, device=gen.device).to(dev) * (hi - lo) + lo)

    scale = u(0.9, 1.0)
    ang = u(-rotate_deg, rotate_deg) * math.pi / 180
    tx, ty = u(-1, 1) * (1 - scale), u(-1, 1) * (1 - scale)
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    bright = u(-0.2, 0.2)[:, None, None, None]
    contrast = u(0.8, 1.2)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(-1, 1)


def _to_model_images(base: torch.Tensor, wrist: torch.Tensor, gen, augment: bool) -> torch.Tensor:
    def prep(img):  # uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (as processing.prepare_inputs)
        return img.permute(0, 3, 1, 2).float() / 255.0 * 2.0 - 1.0

    a, w = prep(base), prep(wrist)
    if augment:
        a = augment_images(a, gen, rotate_deg=5.0)
        w = augment_images(w, gen, rotate_deg=0.0)
    return torch.stack([a, w], dim=1)


def _zero_adaptive_norms(model) -> None:
    """adaLN-Zero: the expert's adaRMS modulation starts at zero (scale 0, shift 0, gate 0)."""
    for name, mod in model.named_modules():
        if name.startswith("paligemma_with_expert.gemma_expert") and getattr(mod, "dense", None) is not None:
            torch.nn.init.zeros_(mod.dense.weight)
            torch.nn.init.zeros_(mod.dense.bias)


def _versions() -> dict:
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["cuda"] = torch.version.cuda
    out["host"] = platform.node()
    out["cpu_count"] = __import__("os").cpu_count()
    return out


def _distributed(s: TrainSettings) -> tuple[int, int, torch.device]:
    """(rank, world size, device): from torchrun's variables when they are set (one process per GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device(s.device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.device(s.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device("cuda", local) if cuda else torch.device("cpu")


def train(s: TrainSettings, *, progress: bool = True) -> dict:
    t_start = time.perf_counter()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, device = _distributed(s)
    progress = progress and rank == 0
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    config = variant_config(s.variant)
    manifest = read_manifest(s.demos)
    trials = sorted({r["trial"] for r in manifest} - set(s.holdout_trials))
    files = demo_files(s.demos, trials=trials)
    arrays = load_demo_arrays(files, config.action_horizon, progress=progress)
    per_step = np.concatenate([arrays.chunks[:, 0]])
    stats = quantile_norm_stats(arrays.state, per_step, source=f"demos:{s.demos}")
    with tempfile.TemporaryDirectory() as tmp:  # deterministic: every rank trains the same pieces, rank 0 keeps them
        tok_path = write_prompt_tokenizer(arrays.prompts, (out if rank == 0 else Path(tmp)) / "tokenizer.model",
                                          vocab_size=config.vocab_size)
        tokenizer = PaligemmaTokenizer(tok_path, config.max_token_len)
    config = config.replace(vocab_size=tokenizer.vocab_size)  # the embedding has exactly the tokenizer's rows
    tokens, masks = prompt_tokens(arrays, stats, tokenizer)
    actions = normalize_actions(arrays.chunks, stats, config.action_dim)
    n = len(arrays)
    if progress:
        print(f"data: {len(files)} episodes, {n} frames, {len(arrays.prompts)} prompts, "
              f"prompt tokens <= {int(masks.sum(1).max())}; {world} process(es) x batch {s.batch}", flush=True)
    if rank == 0:
        write_calibration(arrays, out / CALIB_FILE, seed=s.seed)
    d_base = torch.from_numpy(arrays.image).to(device)
    d_wrist = torch.from_numpy(arrays.wrist_image).to(device)
    d_tokens = torch.from_numpy(tokens).to(device)
    d_masks = torch.from_numpy(masks).to(device)
    d_actions = torch.from_numpy(actions).to(device)
    del arrays.image, arrays.wrist_image

    model = random_model(config, seed=s.seed, precision="float32", device="cpu")
    _zero_adaptive_norms(model)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=s.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator(device=device).manual_seed(s.seed + 1000 * rank)  # each rank its own batches
    history: list[dict] = []
    step = 0
    trained_s = 0.0  # training time of earlier runs (the time budget spans resumes)
    state_path = out / STATE_FILE
    if state_path.is_file():
        st = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        for e, v in zip(ema, st["ema"], strict=True):
            e.copy_(v)
        gens = st.get("gens", [st.get("gen")])
        if rank < len(gens):
            gen.set_state(gens[rank].cpu())
        step, history, trained_s = st["step"], st["history"], float(st.get("trained_s", 0.0))
        if progress:
            print(f"resumed from {state_path} at step {step} ({trained_s / 60:.1f} min trained)", flush=True)
    loss_fn = FlowMatchingLoss(model, fused_attention if s.fused_attention else attention)
    if world > 1:  # the language model's last MLP and final norm feed no loss (only their K/V are read)
        loss_fn = torch.nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    def save_state():
        gens = [gen.get_state()]
        if world > 1:
            gens = [None] * world
            dist.all_gather_object(gens, gen.get_state().cpu())
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema, "gens": gens,
                        "step": step, "history": history, "trained_s": elapsed()}, state_path)

    image_masks = torch.ones(s.batch, 2, dtype=torch.bool, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    t_loop, running, count = time.perf_counter(), torch.zeros((), device=device), 0
    stopped = "steps"
    t_train = time.perf_counter()  # the time budget counts from here (data loading excluded)

    def elapsed() -> float:
        return trained_s + time.perf_counter() - t_train

    budget = None if s.max_minutes is None else 60 * float(s.max_minutes)
    run_limit = None if s.stop_after_minutes is None else 60 * float(s.stop_after_minutes)
    lr, frac = s.lr, 0.0
    while step < s.steps:
        if step % 10 == 0:  # clocks read every 10 steps (a read syncs); all ranks follow rank 0's
            now = [elapsed(), time.perf_counter() - t_train]
            if world > 1:
                t = torch.tensor(now, dtype=torch.float64, device=device)
                dist.broadcast(t, 0)
                now = t.tolist()
            frac = 0.0 if budget is None else now[0] / budget
            if frac >= 1.0:
                stopped = "time budget"
                break
            if run_limit is not None and now[1] >= run_limit:
                stopped = "run limit"
                break
        lr = lr_at(step, s, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (s.batch,), generator=gen, device=gen.device).to(device)
        batch = {
            "images": _to_model_images(d_base[idx], d_wrist[idx], gen, s.augment),
            "image_masks": image_masks,
            "tokens": d_tokens[idx],
            "token_masks": d_masks[idx],
            "actions": d_actions[idx],
        }
        with autocast:
            loss = loss_fn(batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - s.ema)
        running += loss.detach()  # no host sync per step
        count += 1
        step += 1
        if step % s.log_every == 0 or step == s.steps:
            mean_loss = running / count
            if world > 1:
                dist.all_reduce(mean_loss)
                mean_loss = mean_loss / world
            mean_loss = float(mean_loss)
            rate = count / (time.perf_counter() - t_loop)
            history.append({"step": step, "loss": mean_loss, "lr": lr,
                            "grad_norm": float(gnorm), "steps_per_s": round(rate, 2),
                            "samples_per_s": round(rate * s.batch * world, 1),
                            "elapsed_s": round(time.perf_counter() - t_start, 1),
                            "trained_min": round(elapsed() / 60, 2)})
            if progress:
                left = "" if budget is None else f"; {(budget - elapsed()) / 60:.1f} min of the budget left"
                print(f"step {step}/{s.steps} loss {mean_loss:.4f} lr {lr:.2e} {rate:.1f} it/s "
                      f"({rate * s.batch * world:.0f} samples/s){left}", flush=True)
            t_loop, running, count = time.perf_counter(), torch.zeros((), device=device), 0
        if s.save_every and step % s.save_every == 0:
            save_state()
    save_state()
    if rank != 0:
        dist.destroy_process_group()
        return {"rank": rank, "steps_done": step, "stopped": stopped}

    with torch.no_grad():  # the EMA weights are the policy
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    model.eval()
    save_checkpoint(model.to("cpu"), stats, out, precision="float32", tokenizer_path=None)
    log = {
        "settings": dataclasses.asdict(s),
        "stopped": stopped,
        "steps_done": step,
        "processes": world,
        "trained_min": round(elapsed() / 60, 2),
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "data": {
            "demos": str(s.demos), "episodes": len(files), "frames": n, "trials": trials,
            "holdout_trials": list(s.holdout_trials), "prompts": arrays.prompts,
            "expert_versions": sorted({r.get("expert_version", "?") for r in manifest}),
            "suites": sorted({r["suite"] for r in manifest}),
            "demo_seed": sorted({r["seed"] for r in manifest}),
        },
        "variant": s.variant,
        "params": sum(p.numel() for p in params),
        "device": str(device),
        "versions": _versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    (out / LOG_FILE).write_text(json.dumps(log, indent=1) + "\n")
    plot_loss(history, out / "loss.png")
    if stopped in ("steps", "time budget"):
        state_path.unlink(missing_ok=True)  # finished: the checkpoint is the result (resume state ~4x its size)
    if world > 1:
        dist.destroy_process_group()
    return log


def plot_loss(history: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (mean of log interval)")
    ax.set_title("reference policy training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
