"""Pi05Policy: LIBERO observations in, [horizon, 7] actions out, with an explicit noise seed per call."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pytest_duquant.policies.pi05.checkpoint import load_checkpoint, random_norm_stats
from pytest_duquant.policies.pi05.configuration import Pi05Config, variant_config
from pytest_duquant.policies.pi05.errors import CheckpointError
from pytest_duquant.policies.pi05.modeling import Pi05Model, compact_prefix, random_model, short_query_attention
from pytest_duquant.policies.pi05.processing import (
    NormStats,
    build_inputs,
    images_to_float_as_host,
    postprocess_actions,
    prepare_inputs,
)
from pytest_duquant.policies.pi05.tokenizer import PaligemmaTokenizer, resolve_tokenizer_path


def noise_for_seed(seed: int, horizon: int, action_dim: int) -> torch.Tensor:
    """float32 [horizon, action_dim] ~ N(0, 1) from torch.Generator(cpu).manual_seed(seed) (any device).

    Drawn in float64 and rounded to float32: torch's float32 normal sampler computes its logs and cosines with
    the CPU's vector unit, so AVX512, AVX2 and scalar machines drew noise differing in the last float32 bit
    (enough to move a quantized run's action error by percents); float64's last-bit differences do not
    survive the rounding."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((horizon, action_dim), generator=gen, dtype=torch.float64).to(torch.float32)


BATCH_SIZES = (1, 2, 4, 8, 16, 32)  # the fast path pads a batch up to one of these (one CUDA graph each)
TOKEN_BUCKET = 32  # ... and its prompt to a multiple of this many tokens
# Pi05Policy.serve_fast's options by name (`duquant rollouts --serve`, docs/speed.md "Serving"): "graphed" the
# fast path CUDA-graphed, one graph per BATCH_SIZES size; "compiled" the fastest measured on an H200 (the bf16
# call 19.8 ms at batch 1, 53.4 ms at batch 8; LIBERO 4,132 episodes/h with 24 workers, at most 8 a call): the
# Euler step and the prefix torch.compiled, one padded size (one compile, ~65 s on first use), short-query
# attention in the steps, fused q/k/v and gate/up GEMMs and the steps' K/V buffer. Needs CUDA.
SERVING = {
    "graphed": {},
    "compiled": {"compile_step": True, "compile_prefix": True, "batch_sizes": (8,), "short_query": True,
                 "fuse": True},
}


def pad_rows(inputs: dict[str, torch.Tensor], noise: torch.Tensor, size: int):
    """Inputs and noise of `n` rows padded to `size` rows by repeating the last row (rows are independent:
    padding changes no real row's actions beyond float rounding)."""
    n = noise.shape[0]
    if size < n:
        raise ValueError(f"cannot pad a batch of {n} rows to {size}")
    if size == n:
        return inputs, noise
    idx = torch.cat([torch.arange(n), torch.full((size - n,), n - 1, dtype=torch.long)])
    return {k: v.index_select(0, idx.to(v.device)) for k, v in inputs.items()}, noise.index_select(
        0, idx.to(noise.device)
    )


def batch_chunks(n: int, sizes: Sequence[int] | None) -> list[tuple[int, int, int]]:
    """(start, stop, padded size) of each chunk a batch of n rows runs as: the smallest size >= n, or chunks of
    the largest size (the last one padded). sizes None: one chunk of n rows, unpadded."""
    if not sizes:
        return [(0, n, n)]
    sizes = sorted(int(s) for s in sizes)
    out, start = [], 0
    while start < n:
        rest = n - start
        size = next((s for s in sizes if s >= rest), sizes[-1])
        stop = start + min(rest, size)
        out.append((start, stop, size))
        start = stop
    return out


class Pi05Policy:
    """A pi0.5 model with its processing. `model` is a plain nn.Module (quantize_model wraps its linears).

    ``fast=True`` (or :meth:`use_fast`) serves :meth:`Pi05Model.sample_actions_fast` on compacted inputs,
    batches padded to `BATCH_SIZES` (docs/speed.md); the default is openpi's exact path.
    """

    pin_memory = True  # fast path on CUDA: the uint8 images go through pinned memory (an asynchronous copy)

    def __init__(
        self,
        model: Pi05Model,
        norm_stats: NormStats,
        tokenizer,
        *,
        device: str | torch.device = "cpu",
        source: str = "",
        layout: str = "openpi",
        fast: bool = False,
    ):
        self.model = model.to(device).eval()
        self.config: Pi05Config = model.config
        self.norm_stats = norm_stats
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.source = source
        self.layout = layout
        self.fast = False
        self.batch_sizes: tuple[int, ...] | None = None
        self.token_bucket = TOKEN_BUCKET
        self.mode = "eager"
        self._sample = self.model.sample_actions
        self.fast_options: dict = {}  # keyword options of sample_actions_fast (serve_fast)
        if fast:
            self.use_fast()

    # ---- speed options ------------------------------------------------------------------------
    def _sample_fn(self):
        if not self.fast:
            return self.model.sample_actions
        if self.fast_options:
            return functools.partial(self.model.sample_actions_fast, **self.fast_options)
        return self.model.sample_actions_fast

    def use_fast(
        self,
        enabled: bool = True,
        *,
        batch_sizes: Sequence[int] | None = BATCH_SIZES,
        token_bucket: int = TOKEN_BUCKET,
    ) -> Pi05Policy:
        """Serve the fast path (compacted prefix, fused attention, per-call precomputation; docs/speed.md) or,
        with enabled=False, openpi's exact one. batch_sizes: pad every batch to one of these sizes (None: no
        padding); token_bucket: prompts are cut to a multiple of it. Keeps an eager or CUDA-graph mode (new
        graphs for the new path); a compiled policy goes back to eager (compile again)."""
        if token_bucket < 1 or (batch_sizes is not None and (not batch_sizes or min(batch_sizes) < 1)):
            raise ValueError(f"batch_sizes={batch_sizes}, token_bucket={token_bucket}: must be positive")
        self.fast = bool(enabled)
        self.batch_sizes = tuple(sorted(int(b) for b in batch_sizes)) if enabled and batch_sizes else None
        self.token_bucket = int(token_bucket)
        return {"eager": self.eager, "cudagraph": self.cuda_graph}.get(self.mode, self.eager)()

    def serve_fast(
        self,
        *,
        compile_step: bool = False,
        compile_prefix: bool = False,
        batch_sizes: tuple[int, ...] | None = None,
        short_query: bool = False,
        fuse: bool = False,
    ) -> Pi05Policy:
        """The fastest serving this device allows: the fast path, CUDA-graphed on a GPU (one graph per padded
        batch size and prompt bucket; capture happens on first use, so calibrate before it). compile_step:
        also torch.compile the Euler step (`Pi05Model.compile_fast_step`; the first call of each shape
        compiles, then the graph captures the compiled kernels). compile_prefix (with compile_step): the
        prefix (vision tower + language model K/V) too. batch_sizes: the padded sizes (default
        :meth:`use_fast`'s; one size, e.g. (8,), means one graph and one compile for every batch up to it).
        short_query: the Euler steps' attention as `short_query_attention` (the H200's fastest, docs/speed.md).
        fuse: q/k/v and gate/up as one GEMM each (`Pi05Model.fuse_fast_projections`) and the steps' K/V in a
        preallocated buffer (`kv_buffer=True`). All options keep the actions equal up to float rounding."""
        self.fast_options = {**({"step_attn_fn": short_query_attention} if short_query else {}),
                             **({"kv_buffer": True} if fuse else {})}
        self.model.fuse_fast_projections(fuse)
        self.use_fast(**({} if batch_sizes is None else {"batch_sizes": batch_sizes}))
        self.model.compile_fast_step(compile_step, prefix=compile_prefix)
        return self.cuda_graph() if self.device.type == "cuda" else self

    def compile(self, mode: str | None = None, **kwargs) -> Pi05Policy:
        """torch.compile sample_actions (mode e.g. 'max-autotune' / 'reduce-overhead' = CUDA graphs)."""
        self._sample = torch.compile(self._sample_fn(), mode=mode, **kwargs)
        self.mode = "compile"
        return self

    def cuda_graph(self) -> Pi05Policy:
        """Capture sample_actions in a CUDA graph per batch size (eager kernels, no compile)."""
        if self.device.type != "cuda":
            raise RuntimeError("cuda_graph() needs the policy on a CUDA device")
        self._sample = GraphedSampler(self._sample_fn())
        self.mode = "cudagraph"
        return self

    def eager(self) -> Pi05Policy:
        self._sample = self._sample_fn()
        self.mode = "eager"
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
        if not self.fast:
            inputs = self.prepare(observations)
            return self._sample(noise=self.noise(noise_seeds), **inputs)
        return self._raw_actions_fast(observations, noise_seeds)

    def _raw_actions_fast(self, observations: Sequence[dict], noise_seeds: Sequence[int]) -> torch.Tensor:
        """Build on the host with the images still uint8, drop what changes nothing, pad to a served batch size,
        move, and convert the images to float on the device: the model sees the float images the host would
        have made (images_to_float_as_host; bitwise), in the layout it would have had."""
        inputs = build_inputs(list(observations), self.config, self.norm_stats, self.tokenizer)
        noise = torch.stack([noise_for_seed(s, self.config.action_horizon, self.config.action_dim)
                             for s in noise_seeds])
        pin = self.pin_memory and self.device.type == "cuda"
        outs = []
        for start, stop, size in batch_chunks(len(noise_seeds), self.batch_sizes):
            chunk = {k: v[start:stop] for k, v in inputs.items()}
            part = compact_prefix(**chunk, token_bucket=self.token_bucket)
            part, part_noise = pad_rows(part, noise[start:stop], size)
            # the host path converted before compacting and padding; either one (an index_select) made the float
            # images contiguous, else they stayed the channels-last view: keep that layout (it picks the kernels)
            contiguous = part["images"].shape != chunk["images"].shape
            part = {k: v.to(self.device, non_blocking=True) if k != "images" else v for k, v in part.items()}
            images = (part["images"].pin_memory() if pin else part["images"]).to(self.device, non_blocking=True)
            part["images"] = images_to_float_as_host(images, contiguous=contiguous)
            out = self._sample(noise=part_noise.to(self.device, non_blocking=True), **part)
            outs.append(out[: stop - start])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

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
            f"dtype={self.model.compute_dtype}, fast={self.fast}, mode={self.mode!r}, source={self.source!r})"
        )


class GraphedSampler:
    """Replays a captured CUDA graph of `fn(**inputs)`; one graph per input signature (batch size, prompt
    bucket). The graphs share one memory pool (they never run at once, and each output is copied out after its
    replay), so a graph per padded batch size costs its outputs, not a private set of intermediates each."""

    def __init__(self, fn):
        self.fn = fn
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

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
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
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
    fast: bool = False,
) -> Pi05Policy:
    """A random-weight policy (deterministic in `seed`), e.g. the embedded default for CI. fast: serve
    the fast path (:meth:`Pi05Policy.use_fast`).

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
        fast=fast,
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
    fast: bool = False,
) -> Pi05Policy:
    """Load an openpi or lerobot pi0.5 checkpoint directory (layout detected from its files), or a quantized
    checkpoint written by `duquant quantize --save` (policies/pi05/quantized_checkpoint.py).

    dtype None = bfloat16 for the full pi05 variant (as openpi serves it, whatever config.json records),
    the variant's own precision for tiny ones (dummy: float32); "float32" (or $DUQUANT_POLICY_DTYPE) asks.
    Config, norm stats and tokenizer (its vocabulary against the checkpoint's embedding) are validated
    before any weight is read (CheckpointError). fast: serve the fast path (:meth:`Pi05Policy.use_fast`).
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
    return Pi05Policy(model, norm_stats, tok, device=device, source=str(d), layout=layout, fast=fast)
