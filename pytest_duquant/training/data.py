"""Demonstrations -> training tensors for a pi0.5-family policy, with the inference path's processing.

Each frame of a demonstration becomes one training example: its two images (already exactly what
the rollout protocol feeds a policy: flipped, resized with padding to 224), its prompt tokens (the
prompt with the quantile-normalized state as 256 bins, through the same ``normalize_state`` and
tokenizer that serve the policy), and the chunk of the next ``horizon`` expert labels, normalized
with the quantile statistics computed here and zero-padded to the model's action dimension.
Labels past the end of an episode repeat its last label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pytest_duquant.libero.demos import load_demo
from pytest_duquant.policies.pi05.processing import NormStats, QuantileStats, normalize_state


@dataclass
class DemoArrays:
    """All frames of a set of demonstrations, concatenated (numpy, CPU)."""

    image: np.ndarray  # uint8 [N, 224, 224, 3]
    wrist_image: np.ndarray  # uint8 [N, 224, 224, 3]
    state: np.ndarray  # float32 [N, 8]
    chunks: np.ndarray  # float32 [N, horizon, 7] raw labels
    prompt_id: np.ndarray  # int64 [N]
    episode: np.ndarray  # int64 [N]
    prompts: list[str]
    files: list[str]

    def __len__(self) -> int:
        return int(self.state.shape[0])


def action_chunks(actions: np.ndarray, horizon: int) -> np.ndarray:
    """[T, D] labels -> [T, horizon, D]: row t holds labels t..t+horizon-1 (the last label repeated)."""
    t = actions.shape[0]
    idx = np.minimum(np.arange(t)[:, None] + np.arange(horizon)[None, :], t - 1)
    return actions[idx]


def load_demo_arrays(files: list[Path], horizon: int, *, progress: bool = True) -> DemoArrays:
    if not files:
        raise ValueError("no demonstration files to train on")
    heads = []  # first pass: lengths and prompts only (cheap), so the image arrays are allocated once
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            heads.append((int(z["step"].shape[0]), str(z["prompt"]), z["image"].shape[1:] if not heads else None))
    n = sum(k for k, _, _ in heads)
    h, w, c = heads[0][2]
    image = np.empty((n, h, w, c), dtype=np.uint8)
    wrist = np.empty((n, h, w, c), dtype=np.uint8)
    prompts = sorted({p for _, p, _ in heads})
    pid = {p: i for i, p in enumerate(prompts)}
    states, chunks, prompt_ids, episodes = [], [], [], []
    at = 0
    it = enumerate(files)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(files), desc="loading demos", unit="ep", mininterval=5)
    for e, f in it:
        d = load_demo(f)
        k = len(d)
        image[at : at + k] = d.image
        wrist[at : at + k] = d.wrist_image
        at += k
        states.append(d.state.astype(np.float32))
        chunks.append(action_chunks(d.actions.astype(np.float32), horizon))
        prompt_ids.append(np.full(k, pid[d.prompt], dtype=np.int64))
        episodes.append(np.full(k, e, dtype=np.int64))
    return DemoArrays(
        image=image, wrist_image=wrist, state=np.concatenate(states), chunks=np.concatenate(chunks),
        prompt_id=np.concatenate(prompt_ids), episode=np.concatenate(episodes), prompts=prompts,
        files=[str(f) for f in files],
    )


def quantile_norm_stats(state: np.ndarray, actions: np.ndarray, source: str = "") -> NormStats:
    """openpi-style statistics (q01, q99, mean, std) of the states and of the per-step action labels."""

    def stats(x: np.ndarray) -> QuantileStats:
        x = x.astype(np.float64)
        return QuantileStats(
            q01=np.quantile(x, 0.01, axis=0), q99=np.quantile(x, 0.99, axis=0), mean=x.mean(axis=0),
            std=x.std(axis=0),
        )

    return NormStats(state=stats(state), actions=stats(actions), convention="openpi", source=source)


def normalize_actions(chunks: np.ndarray, stats: NormStats, action_dim: int) -> np.ndarray:
    """Raw label chunks [N, H, 7] -> normalized [N, H, action_dim] (openpi quantile form, zero padded)."""
    a = stats.actions
    den = (a.q99 - a.q01).astype(np.float64) + 1e-6
    norm = ((chunks - a.q01) / den * 2.0 - 1.0).astype(np.float32)
    out = np.zeros(chunks.shape[:2] + (action_dim,), dtype=np.float32)
    out[..., : chunks.shape[-1]] = norm
    return out


def prompt_tokens(arrays: DemoArrays, stats: NormStats, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and masks [N, max_len] of every frame: its prompt with its normalized state (as served)."""
    n = len(arrays)
    tokens = np.zeros((n, tokenizer.max_len), dtype=np.int64)
    masks = np.zeros((n, tokenizer.max_len), dtype=bool)
    norm = normalize_state(arrays.state, stats)
    for i in range(n):
        tokens[i], masks[i] = tokenizer.tokenize(arrays.prompts[arrays.prompt_id[i]], norm[i], "openpi")
    return tokens, masks
