"""pi0.5 configuration: architecture sizes of each variant and the processing conventions.

Facts (openpi `src/openpi/models/gemma.py` get_config, `models_pytorch/gemma_pytorch.py`,
`models/pi0_config.py`, `training/config.py` pi05_libero):

- `gemma_2b` (PaliGemma language model): width 2048, depth 18, MLP 16384, 8 heads, 1 KV head, head_dim 256.
- `gemma_300m` (action expert): width 1024, depth 18, MLP 4096, 8 heads, 1 KV head, head_dim 256.
- `dummy` (openpi's test Gemma): width 64, depth 4, MLP 128, 8 heads, 1 KV head, head_dim 16.
- SigLIP So400m/14 at 224 px: width 1152, 27 layers, 16 heads, MLP 4304, 256 tokens per image,
  projector 1152 -> 2048. PaliGemma vocabulary 257152. RMSNorm/LayerNorm eps 1e-6, RoPE theta 10000.
- pi05: action_dim 32, max_token_len 200; pi05_libero: action_horizon 10, discrete_state_input False
  (the state is not fed to the model), quantile normalization, asset id "physical-intelligence/libero".

Our `dummy` variant uses openpi's dummy Gemma for both the language model and the expert, and a
vision tower of our design (openpi has no small SigLIP): width 32, 2 layers, 2 heads, MLP 64,
patch 14 at 224 px (256 tokens per image, like the full model, so processing is identical).

Our `reference` variant is the small pi0.5-family policy this project trains on LIBERO demonstrations
(`pytest_duquant.policies.reference`): the same module tree and processing, sized so that it trains in
minutes on one GPU and runs a LIBERO episode in seconds on a CPU. Language model and expert are Gemma
stacks of width 256, depth 4, 4 query heads, 1 KV head, head_dim 64 (expert MLP 768, language model MLP
512); every expert linear has an input width divisible by 128, so every preset's BLOCK applies. Vision:
width 256, 3 layers, patch 16 at 224 px (196 tokens per image). Two image slots (agent view and wrist;
openpi's empty third slot is left out), the state in the prompt as 256 bins (openpi's
discrete_state_input, the pi0.5 default), a SentencePiece vocabulary of its own trained on LIBERO's
prompts (shipped with the checkpoint), max 64 prompt tokens.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

PALIGEMMA_VOCAB_SIZE = 257_152

# openpi's default LIBERO image slots and which of them carry an image (libero_policy.LiberoInputs:
# the right wrist slot is a zero image with mask False for pi0/pi0.5).
OPENPI_IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
OPENPI_LIBERO_IMAGE_PRESENT = (True, True, False)
OPENPI_LIBERO_ASSET_ID = "physical-intelligence/libero"


@dataclass(frozen=True)
class GemmaSpec:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VisionSpec:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 224

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


GEMMA_VARIANTS: dict[str, GemmaSpec] = {
    "dummy": GemmaSpec(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "gemma_300m": GemmaSpec(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_2b": GemmaSpec(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_ref_lm": GemmaSpec(width=256, depth=4, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=64),
    "gemma_ref_expert": GemmaSpec(width=256, depth=4, mlp_dim=768, num_heads=4, num_kv_heads=1, head_dim=64),
}

SIGLIP_SO400M = VisionSpec(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224)
DUMMY_VISION = VisionSpec(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=14, image_size=224)
REFERENCE_VISION = VisionSpec(width=256, depth=3, mlp_dim=768, num_heads=4, patch_size=16, image_size=224)
REFERENCE_VOCAB_SIZE = 512  # the reference tokenizer's pieces fit in it (policies/reference/tokenizer.py)

# (paligemma_variant, action_expert_variant) of each of our variants, as openpi's config.json names them.
VARIANT_GEMMAS = {
    "pi05": ("gemma_2b", "gemma_300m"),
    "dummy": ("dummy", "dummy"),
    "reference": ("gemma_ref_lm", "gemma_ref_expert"),
}
VARIANTS = tuple(VARIANT_GEMMAS)


class Pi05ConfigError(ValueError):
    """An invalid pi0.5 configuration value; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class Pi05Config:
    """Architecture + processing conventions of one pi0.5 policy."""

    variant: str = "pi05"
    paligemma_variant: str = "gemma_2b"
    action_expert_variant: str = "gemma_300m"
    vision: VisionSpec = SIGLIP_SO400M
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    action_dim: int = 32
    action_horizon: int = 10
    max_token_len: int = 200
    num_steps: int = 10
    # Time embedding (openpi create_sinusoidal_pos_embedding) and norms.
    min_period: float = 4e-3
    max_period: float = 4.0
    rms_norm_eps: float = 1e-6
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    # Processing conventions.
    image_keys: tuple[str, ...] = OPENPI_IMAGE_KEYS
    image_present: tuple[bool, ...] = OPENPI_LIBERO_IMAGE_PRESENT
    discrete_state_input: bool = False  # pi05_libero: False; lerobot pi05 / pi05_droid: True
    prompt_format: str = "openpi"  # "openpi" (PaligemmaTokenizer) or "lerobot" (Pi05PrepareState... step)
    norm_convention: str = (
        "openpi"  # quantile eps: openpi adds 1e-6; lerobot substitutes 1e-8 only if q99 == q01
    )
    output_action_dim: int = 7  # LIBERO: first 7 of 32
    precision: str = "bfloat16"  # dtype stored in / intended for the checkpoint
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        for name in ("paligemma_variant", "action_expert_variant"):
            value = getattr(self, name)
            if value not in GEMMA_VARIANTS:
                raise Pi05ConfigError(f"{name}={value!r}: must be one of {sorted(GEMMA_VARIANTS)}")
        vlm, exp = self.vlm, self.expert
        for attr in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(vlm, attr) != getattr(exp, attr):
                raise Pi05ConfigError(
                    f"{self.paligemma_variant} and {self.action_expert_variant} differ in {attr} "
                    f"({getattr(vlm, attr)} vs {getattr(exp, attr)}): joint attention needs them equal"
                )
        if len(self.image_keys) != len(self.image_present):
            raise Pi05ConfigError(
                f"image_keys {self.image_keys} and image_present {self.image_present} differ in length"
            )
        if self.prompt_format not in ("openpi", "lerobot"):
            raise Pi05ConfigError(f"prompt_format={self.prompt_format!r}: must be 'openpi' or 'lerobot'")
        if self.norm_convention not in ("openpi", "lerobot"):
            raise Pi05ConfigError(f"norm_convention={self.norm_convention!r}: must be 'openpi' or 'lerobot'")
        if self.precision not in ("bfloat16", "float32"):
            raise Pi05ConfigError(f"precision={self.precision!r}: must be 'bfloat16' or 'float32'")
        for name in ("action_horizon", "max_token_len", "num_steps", "action_dim"):
            if int(getattr(self, name)) <= 0:
                raise Pi05ConfigError(f"{name}={getattr(self, name)!r}: must be a positive integer")
        if not 0 < self.output_action_dim <= self.action_dim:
            raise Pi05ConfigError(
                f"output_action_dim={self.output_action_dim}: must be in 1..{self.action_dim}"
            )

    @property
    def vlm(self) -> GemmaSpec:
        return GEMMA_VARIANTS[self.paligemma_variant]

    @property
    def expert(self) -> GemmaSpec:
        return GEMMA_VARIANTS[self.action_expert_variant]

    @property
    def num_image_tokens(self) -> int:
        return len(self.image_keys) * self.vision.num_patches

    @property
    def prefix_len(self) -> int:
        return self.num_image_tokens + self.max_token_len

    def replace(self, **changes) -> Pi05Config:
        return dataclasses.replace(self, **changes)

    # ---- config.json (openpi's converter writes the first five keys; ours are under "pytest_duquant") ----
    def to_json_dict(self) -> dict[str, Any]:
        ours = {
            "variant": self.variant,
            "vision": dataclasses.asdict(self.vision),
            "vocab_size": self.vocab_size,
            "max_token_len": self.max_token_len,
            "num_steps": self.num_steps,
            "image_keys": list(self.image_keys),
            "image_present": list(self.image_present),
            "discrete_state_input": self.discrete_state_input,
            "prompt_format": self.prompt_format,
            "norm_convention": self.norm_convention,
            "output_action_dim": self.output_action_dim,
        }
        ours.update(self.extras)
        return {
            "action_dim": self.action_dim,
            "action_horizon": self.action_horizon,
            "paligemma_variant": self.paligemma_variant,
            "action_expert_variant": self.action_expert_variant,
            "precision": self.precision,
            "pytest_duquant": ours,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> Pi05Config:
        pg = data.get("paligemma_variant")
        ae = data.get("action_expert_variant")
        if pg is None or ae is None:
            raise Pi05ConfigError(
                f"{source}: needs 'paligemma_variant' and 'action_expert_variant' (found keys {sorted(data)})"
            )
        ours = dict(data.get("pytest_duquant") or {})
        variant = ours.pop("variant", None) or _variant_of(pg, ae, source)
        base = variant_config(variant)
        kwargs: dict[str, Any] = {
            "variant": variant,
            "paligemma_variant": pg,
            "action_expert_variant": ae,
            "action_dim": int(data.get("action_dim", base.action_dim)),
            "action_horizon": int(data.get("action_horizon", base.action_horizon)),
            "precision": str(data.get("precision", base.precision)),
        }
        if "vision" in ours:
            kwargs["vision"] = VisionSpec(**ours.pop("vision"))
        for key in ("vocab_size", "max_token_len", "num_steps", "output_action_dim"):
            if key in ours:
                kwargs[key] = int(ours.pop(key))
        for key in ("image_keys", "image_present"):
            if key in ours:
                kwargs[key] = tuple(ours.pop(key))
        for key in ("discrete_state_input",):
            if key in ours:
                kwargs[key] = bool(ours.pop(key))
        for key in ("prompt_format", "norm_convention"):
            if key in ours:
                kwargs[key] = str(ours.pop(key))
        kwargs["extras"] = ours
        return base.replace(**kwargs)


def _variant_of(paligemma_variant: str, action_expert_variant: str, source: str) -> str:
    for name, pair in VARIANT_GEMMAS.items():
        if pair == (paligemma_variant, action_expert_variant):
            return name
    raise Pi05ConfigError(
        f"{source}: paligemma_variant={paligemma_variant!r}, action_expert_variant={action_expert_variant!r} "
        f"is not a known pi0.5 variant; known: " + ", ".join(f"{k} = {v}" for k, v in VARIANT_GEMMAS.items())
    )


def variant_config(variant: str = "pi05", **changes) -> Pi05Config:
    """The config of a named variant ('pi05' full size, 'dummy' tiny, 'reference' trained here), with changes."""
    if variant == "pi05":
        cfg = Pi05Config(variant="pi05")
    elif variant == "dummy":
        cfg = Pi05Config(
            variant="dummy",
            paligemma_variant="dummy",
            action_expert_variant="dummy",
            vision=DUMMY_VISION,
            precision="float32",
        )
    elif variant == "reference":
        cfg = Pi05Config(
            variant="reference",
            paligemma_variant="gemma_ref_lm",
            action_expert_variant="gemma_ref_expert",
            vision=REFERENCE_VISION,
            vocab_size=REFERENCE_VOCAB_SIZE,
            max_token_len=64,
            image_keys=("base_0_rgb", "left_wrist_0_rgb"),
            image_present=(True, True),
            discrete_state_input=True,
            precision="float32",
        )
    else:
        raise Pi05ConfigError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    return cfg.replace(**changes) if changes else cfg


def load_config_json(path) -> Pi05Config:
    with open(path) as f:
        return Pi05Config.from_json_dict(json.load(f), source=str(path))
