"""Pi05Policy: LIBERO observations in, [horizon, 7] actions out, with an explicit noise seed per call."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pytest_duquant.policies.pi05.checkpoint import load_checkpoint, random_norm_stats
from pytest_duquant.policies.pi05.configuration import Pi05Config, variant_config
from pytest_duquant.policies.pi05.errors import CheckpointError
from pytest_duquant.policies.pi05.modeling import Pi05Model, random_model
from pytest_duquant.policies.pi05.processing import NormStats, postprocess_actions, prepare_inputs
from pytest_duquant.policies.pi05.tokenizer import PaligemmaTokenizer, resolve_tokenizer_path


def noise_for_seed(seed: int, horizon: int, action_dim: int) -> torch.Tensor:
    """float32 [horizon, action_dim] ~ N(0, 1) from torch.Generator(cpu).manual_seed(seed) (any device).

    Drawn in float64 and rounded to float32: torch's float32 normal sampler computes its logs and cosines with
    the CPU's vector unit, so AVX512, AVX2 and scalar machines drew noise differing in the last float32 bit
    (enough to move a quantized run's action error by percents); float64's last-bit differences do not
    survive the rounding."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((horizon, action_dim), generator=gen, dtype=torch.float64).to(torch.float32)


class Pi05Policy:
    """A pi0.5 model with its processing. `model` is a plain nn.Module (quantize_model wraps its linears)."""

    def __init__(
        self,
        model: Pi05Model,
        norm_stats: NormStats,
        tokenizer,
        *,
        device: str | torch.device = "cpu",
        source: str = "",
        layout: str = "openpi",
    ):
        self.model = model.to(device).eval()
        self.config: Pi05Config = model.config
        self.norm_stats = norm_stats
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.source = source
        self.layout = layout
        self._sample = self.model.sample_actions

    # ---- speed options ------------------------------------------------------------------------
    def compile(self, mode: str | None = None, **kwargs) -> Pi05Policy:
        """torch.compile sample_actions (mode e.g. 'max-autotune' / 'reduce-overhead' = CUDA graphs)."""
        self._sample = torch.compile(self.model.sample_actions, mode=mode, **kwargs)
        return self

    def cuda_graph(self) -> Pi05Policy:
        """Capture sample_actions in a CUDA graph per batch size (eager kernels, no compile)."""
        if self.device.type != "cuda":
            raise RuntimeError("cuda_graph() needs the policy on a CUDA device")
        self._sample = GraphedSampler(self.model.sample_actions)
        return self

    def eager(self) -> Pi05Policy:
        self._sample = self.model.sample_actions
        return self

    # ---- inference ----------------------------------------------------------------------------
    def prepare(self, observations: Sequence[dict]) -> dict[str, torch.Tensor]:
        return prepare_inputs(list(observations), self.config, self.norm_stats, self.tokenizer, self.device)

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        cfg = self.config
        return torch.stack([noise_for_seed(s, cfg.action_horizon, cfg.action_dim) for s in seeds]).to(
            self.device
        )

    @torch.no_grad()
    def raw_actions(self, observations: Sequence[dict], noise_seeds: Sequence[int]) -> torch.Tensor:
        """Normalized model output [N, horizon, action_dim] (float32) before unnormalization."""
        if len(observations) != len(noise_seeds):
            raise ValueError(f"{len(observations)} observations but {len(noise_seeds)} noise seeds")
        inputs = self.prepare(observations)
        return self._sample(noise=self.noise(noise_seeds), **inputs)

    def infer_batch(self, observations: Sequence[dict], noise_seeds: Sequence[int]) -> np.ndarray:
        """-> float32 [N, horizon, 7] actions in env units; observation i gets the noise of noise_seeds[i]."""
        return postprocess_actions(self.raw_actions(observations, noise_seeds), self.config, self.norm_stats)

    def infer(self, observation: dict, noise_seed: int = 0) -> np.ndarray:
        """-> float32 [horizon, 7] actions for one observation."""
        return self.infer_batch([observation], [noise_seed])[0]

    def __repr__(self) -> str:
        return (
            f"Pi05Policy(variant={self.config.variant!r}, layout={self.layout!r}, "
            f"device={str(self.device)!r}, "
            f"dtype={self.model.compute_dtype}, source={self.source!r})"
        )


class GraphedSampler:
    """Replays a captured CUDA graph of `fn(**inputs)`; one graph per input signature (batch size)."""

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict[tuple, tuple] = {}

    @torch.no_grad()
    def __call__(self, **inputs):
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))
        if key not in self.graphs:
            static_in = {k: v.clone() for k, v in inputs.items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.fn(**static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(**static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        for k, v in inputs.items():
            static_in[k].copy_(v)
        graph.replay()
        return static_out.clone()


def _dtype_name(dtype) -> str:
    if dtype in (None, torch.float32, "float32", "fp32"):
        return "float32"
    if dtype in (torch.bfloat16, "bfloat16", "bf16"):
        return "bfloat16"
    raise CheckpointError(f"dtype {dtype!r}: must be float32 or bfloat16")


def build_policy(
    variant: str = "dummy",
    seed: int = 0,
    dtype: torch.dtype | str = torch.float32,
    *,
    device: str | torch.device = "cpu",
    tokenizer=None,
    norm_stats: NormStats | None = None,
    config: Pi05Config | None = None,
) -> Pi05Policy:
    """A random-weight policy (deterministic in `seed`), e.g. the embedded default for CI.

    tokenizer: a PaligemmaTokenizer, a path, or None (OPENPI_TOKENIZER / openpi cache, else a tiny one trained
    into a temporary directory).
    """
    config = config or variant_config(variant)
    model = random_model(config, seed, _dtype_name(dtype))
    tok = _tokenizer(tokenizer, None, config)
    return Pi05Policy(
        model,
        norm_stats or random_norm_stats(seed),
        tok,
        device=device,
        source=f"random:{config.variant}:seed={seed}",
    )


def _tokenizer(tokenizer, ckpt_dir, config: Pi05Config, allow_tiny: bool = True):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    try:
        path = resolve_tokenizer_path(tokenizer, ckpt_dir)
    except CheckpointError:
        if tokenizer is not None or not allow_tiny or ckpt_dir is not None:
            raise
        from pytest_duquant.policies.pi05.tokenizer import tiny_tokenizer_proto

        return PaligemmaTokenizer(None, config.max_token_len, model_proto=tiny_tokenizer_proto())
    return PaligemmaTokenizer(path, config.max_token_len)


def load_policy(
    ckpt_dir: str | os.PathLike,
    tokenizer=None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    asset_id: str | None = None,
    discrete_state_input: bool | None = None,
) -> Pi05Policy:
    """Load an openpi or lerobot pi0.5 checkpoint directory (layout detected from its files), or a quantized
    checkpoint written by `duquant quantize --save` (policies/pi05/quantized_checkpoint.py).

    dtype None = bfloat16 for the full pi05 variant (as openpi serves it, whatever config.json records),
    the variant's own precision for tiny ones (dummy: float32); "float32" (or $DUQUANT_POLICY_DTYPE) asks.
    Config, norm stats and tokenizer (its vocabulary against the checkpoint's embedding) are validated
    before any weight is read (CheckpointError).
    """
    from pytest_duquant.policies.pi05.checkpoint import (
        check_tokenizer_vocab,
        detect_layout,
        read_config,
        read_norm_stats,
    )

    d = Path(ckpt_dir)
    from pytest_duquant.policies.pi05 import quantized_checkpoint as qc

    if qc.is_quantized_checkpoint(d):  # docs/quantized-checkpoints.md: loaded as saved, nothing re-quantized
        model, stats, tok, layout, manifest = qc.load_quantized(d, tokenizer, device, dtype)
        return qc.label(Pi05Policy(model, stats, tok, device=device, source=str(d), layout=layout), manifest, d)
    layout = detect_layout(d)
    config = read_config(d, layout)
    read_norm_stats(d, layout, asset_id)  # fail early
    tok = _tokenizer(tokenizer, d, config, allow_tiny=False)
    check_tokenizer_vocab(tok, d, layout, config)
    overrides = {} if discrete_state_input is None else {"discrete_state_input": bool(discrete_state_input)}
    model, config, norm_stats, layout = load_checkpoint(
        d, device=device, dtype=dtype, asset_id=asset_id, config_overrides=overrides
    )
    return Pi05Policy(model, norm_stats, tok, device=device, source=str(d), layout=layout)
