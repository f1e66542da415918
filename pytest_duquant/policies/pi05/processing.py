"""Observation -> model inputs and model outputs -> LIBERO actions (openpi pi05_libero conventions).

Input observation (one dict per env, the openpi LIBERO client's keys; short aliases accepted):
    "observation/image"        uint8 [H, W, 3] agent view, flipped 180 deg by the harness (alias "image")
    "observation/wrist_image"  uint8 [H, W, 3] wrist view, flipped by the harness (alias "wrist_image")
    "observation/state"        float [8]: eef pos (3) + axis-angle (3) + gripper qpos (2) (alias "state")
    "prompt"                   str, the task's language instruction

Steps (openpi Policy transforms for pi05_libero, in order):
  1. images to uint8 HWC (float images are scaled by 255 as openpi's _parse_image does);
  2. state normalized with quantiles: (x - q01) / (q99 - q01 + 1e-6) * 2 - 1 (lerobot:
     / (q99 - q01), 1e-8 only where q99 == q01); used only when the state goes into the prompt
     (discrete_state_input);
  3. resize with padding to 224 x 224 (openpi-client's PIL bilinear resize; zero padding; no-op at 224);
  4. prompt tokenized (tokenizer.py), padded to max_token_len;
  5. image slots: [base, left wrist, right wrist] for openpi (the right wrist: zero image, mask False),
     [image, wrist_image] for lerobot LIBERO checkpoints; pixels -> float32 x / 255 * 2 - 1, NCHW;
  6. actions [H, 32] -> first dims unnormalized with the action quantiles, then the first 7 returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pytest_duquant.policies.pi05.configuration import Pi05Config
from pytest_duquant.policies.pi05.errors import CheckpointError
from pytest_duquant.policies.pi05.images import resize_with_pad

IMAGE_KEYS = ("observation/image", "observation/wrist_image")
KEY_ALIASES = {
    "observation/image": ("observation/image", "image"),
    "observation/wrist_image": ("observation/wrist_image", "wrist_image"),
    "observation/state": ("observation/state", "state"),
    "prompt": ("prompt", "task"),
}


@dataclass(frozen=True)
class QuantileStats:
    """q01/q99 (and optional mean/std) of one feature."""

    q01: np.ndarray
    q99: np.ndarray
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


@dataclass(frozen=True)
class NormStats:
    state: QuantileStats
    actions: QuantileStats
    convention: str = "openpi"  # or "lerobot"
    source: str = ""

    def to_openpi_json(self) -> dict[str, Any]:
        def one(s: QuantileStats) -> dict[str, list[float]]:
            d = {"q01": s.q01.tolist(), "q99": s.q99.tolist()}
            d["mean"] = (s.mean if s.mean is not None else (s.q01 + s.q99) / 2).tolist()
            d["std"] = (s.std if s.std is not None else (s.q99 - s.q01) / 4).tolist()
            return d

        return {"norm_stats": {"state": one(self.state), "actions": one(self.actions)}}


def _denominator(stats: QuantileStats, convention: str) -> np.ndarray:
    span = (stats.q99 - stats.q01).astype(np.float64)
    if convention == "lerobot":
        return np.where(span == 0, 1e-8, span)
    return span + 1e-6


def normalize_state(state: np.ndarray, stats: NormStats) -> np.ndarray:
    s = stats.state
    d = state.shape[-1]
    q01, den = s.q01[..., :d], _denominator(s, stats.convention)[..., :d]
    return ((state - q01) / den * 2.0 - 1.0).astype(np.float32)


def unnormalize_actions(actions: np.ndarray, stats: NormStats) -> np.ndarray:
    a = stats.actions
    dim = a.q01.shape[-1]
    den = _denominator(a, stats.convention)
    head = (actions[..., :dim] + 1.0) / 2.0 * den + a.q01
    if dim < actions.shape[-1]:
        return np.concatenate([head, actions[..., dim:]], axis=-1).astype(np.float32)
    return head.astype(np.float32)


def parse_image(image: Any, name: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3:
        raise CheckpointError(f"observation {name!r}: expected an image [H, W, 3], got shape {img.shape}")
    if np.issubdtype(img.dtype, np.floating):
        img = (255 * img).astype(np.uint8)
    if img.shape[0] == 3 and img.shape[-1] != 3:
        img = np.ascontiguousarray(np.transpose(img, (1, 2, 0)))
    if img.shape[-1] != 3:
        raise CheckpointError(f"observation {name!r}: expected 3 channels, got shape {img.shape}")
    return img.astype(np.uint8, copy=False)


def _get(obs: dict, key: str, index: int):
    for k in KEY_ALIASES[key]:
        if k in obs:
            return obs[k]
    raise CheckpointError(
        f"observation {index}: missing {key!r} (accepted keys: {KEY_ALIASES[key]}); found {sorted(obs)}"
    )


def build_inputs(
    observations: list[dict], config: Pi05Config, norm_stats: NormStats, tokenizer
) -> dict[str, torch.Tensor]:
    """Batch of observations -> {'images', 'image_masks', 'tokens', 'token_masks'} host (CPU) tensors, the images
    still uint8 [B, N, H, W, 3] as resized (a masked slot: zeros); :func:`images_to_float` makes the model's."""
    size = config.vision.image_size
    n_slots = len(config.image_keys)
    b = len(observations)
    images = np.zeros((b, n_slots, size, size, 3), dtype=np.uint8)
    image_masks = np.zeros((b, n_slots), dtype=bool)
    tokens = np.zeros((b, config.max_token_len), dtype=np.int64)
    token_masks = np.zeros((b, config.max_token_len), dtype=bool)
    for i, obs in enumerate(observations):
        if not isinstance(obs, dict):
            raise CheckpointError(f"observation {i}: expected a dict, got {type(obs).__name__}")
        given = [parse_image(_get(obs, k, i), k) for k in IMAGE_KEYS]
        src = 0
        for slot, present in enumerate(config.image_present):
            if present:
                if src >= len(given):
                    raise CheckpointError(
                        f"config has more present image slots than the 2 LIBERO images: {config.image_keys}"
                    )
                images[i, slot] = resize_with_pad(given[src], size, size)
                image_masks[i, slot] = True
                src += 1
        prompt = _get(obs, "prompt", i)
        if not isinstance(prompt, str):
            prompt = str(np.asarray(prompt).item())
        state = None
        if config.discrete_state_input or config.prompt_format == "lerobot":
            raw = np.asarray(_get(obs, "observation/state", i), dtype=np.float32)
            state = normalize_state(raw, norm_stats)
        tokens[i], token_masks[i] = tokenizer.tokenize(prompt, state, config.prompt_format)
    if tokens.max(initial=0) >= config.vocab_size:
        raise CheckpointError(
            f"tokenizer {getattr(tokenizer, 'path', '?')} produced token id {int(tokens.max())} >= "
            "the model's "
            f"vocab_size {config.vocab_size}: wrong tokenizer for this checkpoint"
        )
    return {
        "images": torch.from_numpy(images),
        "image_masks": torch.from_numpy(image_masks),
        "tokens": torch.from_numpy(tokens),
        "token_masks": torch.from_numpy(token_masks),
    }


def prepare_inputs(
    observations: list[dict],
    config: Pi05Config,
    norm_stats: NormStats,
    tokenizer,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Batch of observations -> {'images', 'image_masks', 'tokens', 'token_masks'} tensors on `device`; images
    float32 [B, N, 3, H, W] in [-1, 1], converted on `device` (:func:`images_to_float`)."""
    inputs = {k: v.to(device) for k, v in build_inputs(observations, config, norm_stats, tokenizer).items()}
    inputs["images"] = images_to_float(inputs["images"])
    return inputs


def images_to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1], computed where they are: x / 255 * 2 - 1
    (the one place of the formula). The result is a channels-last view (the HWC memory, permuted), as
    prepare_inputs has always returned it.

    On CUDA, dividing by a Python number is a multiplication by its float32 reciprocal: 111 of the 256 byte
    values end up one float32 step away from the CPU's division; :func:`images_to_float_as_host` gives the
    CPU's values on any device."""
    return _unit_range(pixels.movedim(-1, -3))


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32) / 255.0 * 2.0 - 1.0


_PIXEL_TABLES: dict[torch.device, torch.Tensor] = {}


def pixel_table(device: str | torch.device = "cpu") -> torch.Tensor:
    """float32 [256]: the CPU's x / 255 * 2 - 1 of every byte value x, on `device` (cached per device)."""
    device = torch.device(device)
    table = _PIXEL_TABLES.get(device)
    if table is None:
        table = _unit_range(torch.arange(256, dtype=torch.uint8)).to(device)
        _PIXEL_TABLES[device] = table
    return table


def images_to_float_as_host(
    pixels: torch.Tensor, *, contiguous: bool = False, lookup: bool | None = None
) -> torch.Tensor:
    """:func:`images_to_float` of uint8 images on any device, bitwise equal to what the CPU computes: the formula
    on the CPU, a look-up in :func:`pixel_table` elsewhere (``lookup`` forces either). The serving fast path
    moves uint8 images to the device and converts them there with this (4x fewer bytes to copy, no host
    float work). contiguous: a contiguous [..., 3, H, W] tensor instead of the channels-last view."""
    if lookup is None:
        lookup = pixels.device.type != "cpu"
    if pixels.dtype != torch.uint8:
        raise TypeError(f"images_to_float_as_host: expected uint8 images, got {pixels.dtype}")
    if lookup:
        out = pixel_table(pixels.device)[pixels.int()].movedim(-1, -3)
    else:
        out = images_to_float(pixels)
    return out.contiguous() if contiguous else out


def postprocess_actions(
    actions: torch.Tensor | np.ndarray, config: Pi05Config, norm_stats: NormStats
) -> np.ndarray:
    """Model actions [..., H, action_dim] (normalized) -> [..., H, output_action_dim] in env units."""
    a = actions.detach().float().cpu().numpy() if isinstance(actions, torch.Tensor) else np.asarray(actions)
    if norm_stats.convention == "lerobot":  # lerobot truncates first, then unnormalizes
        return unnormalize_actions(a[..., : config.output_action_dim], norm_stats)
    return unnormalize_actions(a, norm_stats)[..., : config.output_action_dim]


def synthetic_observations(
    n: int, seed: int = 0, *, image_size: int = 256, prompts: list[str] | None = None
) -> list[dict]:
    """LIBERO-like observations without the simulator (for calibration smoke runs and tests).

    Images are smooth random colour fields with a few rectangles (not pure noise), 256 x 256 like LIBERO's
    render (resized to 224 by the processing); states look like eef pos/axis-angle/gripper values.
    """
    rng = np.random.default_rng(seed)
    default_prompts = [
        "pick up the black bowl between the plate and the ramekin and place it on the plate",
        "put both the alphabet soup and the tomato sauce in the basket",
        "open the middle drawer of the cabinet",
        "put the cream cheese in the bowl",
    ]
    prompts = prompts or default_prompts
    out = []
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    for i in range(n):
        imgs = []
        for _ in range(2):
            base = rng.uniform(0, 255, size=(3,))
            grad = rng.uniform(-80, 80, size=(2, 3))
            img = base + yy[..., None] * grad[0] + xx[..., None] * grad[1]
            for _ in range(4):
                y0, x0 = rng.integers(0, image_size - 40, size=2)
                h, w = rng.integers(10, 60, size=2)
                img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, size=(3,))
            img = img + rng.normal(0, 4, size=img.shape)
            imgs.append(np.clip(img, 0, 255).astype(np.uint8))
        state = np.concatenate(
            [
                rng.normal([0.0, 0.0, 1.0], 0.1),
                rng.normal(0, 1.0, size=3),
                rng.uniform(0, 0.04, size=2) * [1, -1],
            ]
        ).astype(np.float32)
        out.append(
            {
                "observation/image": imgs[0],
                "observation/wrist_image": imgs[1],
                "observation/state": state,
                "prompt": prompts[i % len(prompts)],
            }
        )
    return out
