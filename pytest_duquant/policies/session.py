"""Glue between the pytest fixtures and the pi0.5 policy: the session's FP policy, quantization + calibration.

- `policy_factory(ckpt_dir, tokenizer=None, backend="builtin")` -> a callable returning a fresh FP policy:
  `--ckpt` loaded by our pi0.5 loader (or openpi's, backend "openpi"); without a checkpoint, the built-in
  dummy pi0.5, written once by `duquant init-checkpoint --variant dummy --seed 0` into the user cache
  (`builtin_checkpoint_dir`, reused by later runs) and loaded from there, so "no --ckpt" and
  "--ckpt <that checkpoint>" are the same model with the same fingerprint (and share the model goldens).
- `quantize_and_calibrate(policy, config, observations=None)` -> (policy, QuantReport): quantize the
  policy's model in place, then observe CALIB_STEPS real policy calls (every denoising step) inside
  `calibration(model)` and freeze the activation scales.
- `checkpoint_fingerprint(ckpt_dir)`: sha256 of the weights file and config.json (16 hex), deterministic.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from pytest_duquant import progress
from pytest_duquant.config import DuQuantConfig
from pytest_duquant.quantize import QuantReport, calibration, quantize_model
from pytest_duquant.selection import linear_choices

BUILTIN_VARIANT = "dummy"
BUILTIN_SEED = 0
CALIB_OBS = 8  # distinct synthetic calibration observations (cycled over CALIB_STEPS calls)
CALIB_OBS_SEED = 0
CALIB_NOISE_SEED = 10_000  # call i uses noise seed CALIB_NOISE_SEED + i
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

_BUILTIN_DIRS: dict[tuple[str, int], Path] = {}


class SessionPolicyError(RuntimeError):
    """The session policy cannot be made (bad checkpoint directory, unusable backend)."""


# ---- fingerprints ------------------------------------------------------------------------------
def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def checkpoint_fingerprint(ckpt_dir: str | os.PathLike) -> str:
    """16 hex of sha256(weights file bytes, config.json bytes): same checkpoint files -> same fingerprint."""
    d = Path(ckpt_dir)
    weights, config = d / WEIGHTS_NAME, d / CONFIG_NAME
    for p in (weights, config):
        if not p.is_file():
            raise SessionPolicyError(f"checkpoint {d}: {p.name} is missing, cannot fingerprint it")
    h = hashlib.sha256()
    h.update(b"pytest-duquant checkpoint v1\0")
    _hash_file(h, weights)
    h.update(b"\0config\0")
    _hash_file(h, config)
    return h.hexdigest()[:16]


def tokenizer_digest(policy) -> str | None:
    """16 hex of the policy's tokenizer model file (goldens record it: prompts become tokens through it)."""
    tok = getattr(policy, "tokenizer", None)
    path = getattr(tok, "path", None)
    if isinstance(path, Path) and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return None


_GENERATOR_SOURCES = (
    "policies/session.py",
    "policies/pi05/checkpoint.py",
    "policies/pi05/configuration.py",
    "policies/pi05/modeling.py",
    "policies/pi05/tokenizer.py",
)


def builtin_cache_root() -> Path:
    """Where built-in checkpoints are kept between runs: $DUQUANT_CACHE_DIR, else <user cache>/pytest-duquant."""
    root = os.environ.get("DUQUANT_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pytest-duquant"


def _generator_digest() -> str:
    """12 hex of the code that writes a built-in checkpoint (a change of it means other files)."""
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(torch.__version__.encode())
    for rel in _GENERATOR_SOURCES:
        h.update(rel.encode())
        h.update((pkg / rel).read_bytes())
    return h.hexdigest()[:12]


def builtin_checkpoint_dir(variant: str = BUILTIN_VARIANT, seed: int = BUILTIN_SEED) -> Path:
    """The built-in random checkpoint, written once and reused: one folder per (variant, seed, generating
    code) under `builtin_cache_root()`, so runs without --ckpt neither rewrite it each time nor leave a copy
    per run in the temp folder. Written into a sibling temp folder and renamed, so a crash or a parallel
    run never sees half a checkpoint; folders of older generating code for the same variant and seed are
    removed."""
    key = (variant, int(seed))
    d = _BUILTIN_DIRS.get(key)
    if d is not None and (d / WEIGHTS_NAME).is_file():
        return d
    root = builtin_cache_root()
    stem = f"{variant}-seed{int(seed)}-"
    d = root / f"{stem}{_generator_digest()}"
    if not (d / WEIGHTS_NAME).is_file() or not (d / CONFIG_NAME).is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}", dir=root))
        try:
            with progress.phase(f"writing the built-in {variant} checkpoint (seed {seed}) to {d}", announce=True):
                init_checkpoint(tmp, variant, int(seed))
            try:
                os.replace(tmp, d)
            except OSError:  # another process finished first: use its copy
                if not (d / WEIGHTS_NAME).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        for old in root.glob(f"{stem}*"):
            if old != d and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    _BUILTIN_DIRS[key] = d
    return d


# ---- policies ----------------------------------------------------------------------------------
def policy_module(policy) -> nn.Module:
    """The nn.Module quantize_model works on: Pi05Policy.model, or openpi's model behind the adapter."""
    model = getattr(policy, "model", None)
    if isinstance(model, nn.Module):
        return model
    inner = getattr(policy, "policy", None)
    for attr in ("_model", "model"):
        model = getattr(inner, attr, None)
        if isinstance(model, nn.Module):
            return model
    raise SessionPolicyError(
        f"{type(policy).__name__}: no nn.Module found to quantize (.model / .policy._model)"
    )


def policy_factory(
    ckpt_dir: str | os.PathLike | None,
    tokenizer=None,
    backend: str = "builtin",
    *,
    device: str = "cpu",
    dtype=None,
) -> Callable[[], object]:
    """A callable returning a fresh FP policy (each call loads a new copy). Attributes set on each policy:
    `fingerprint` (checkpoint fingerprint), `ckpt_dir`, `preset` ("fp")."""
    if backend not in ("builtin", "openpi"):
        raise SessionPolicyError(f"--policy-backend={backend}: must be builtin or openpi")
    if ckpt_dir is not None:
        ckpt = Path(ckpt_dir).expanduser()
        if not ckpt.is_dir():
            raise SessionPolicyError(f"--ckpt {ckpt}: no such checkpoint directory")
    elif backend == "openpi":
        raise SessionPolicyError(
            "--policy-backend=openpi needs --ckpt (openpi cannot build the built-in dummy)"
        )
    else:
        ckpt = builtin_checkpoint_dir()
    from pytest_duquant.policies.pi05 import quantized_checkpoint as qc

    manifest = None
    if qc.is_quantized_checkpoint(ckpt):  # labelled with its FP checkpoint's fingerprint (the goldens' key)
        if backend != "builtin":
            raise SessionPolicyError(f"--ckpt {ckpt}: a quantized checkpoint loads with the builtin backend only")
        try:
            manifest = qc.read_manifest(ckpt)
        except qc.CheckpointError as exc:
            raise SessionPolicyError(str(exc)) from None
    weights = ckpt / (WEIGHTS_NAME if manifest is None else qc.TENSORS_NAME)
    big = weights.is_file() and weights.stat().st_size > 1 << 30
    with progress.phase(f"fingerprint of {weights}", announce=big):
        fingerprint = checkpoint_fingerprint(ckpt) if manifest is None else manifest["fp_fingerprint"]

    def make():
        with progress.phase(f"loading pi0.5 from {ckpt}", announce=big):
            return _load()

    def _load():
        if backend == "openpi":
            from pytest_duquant.policies.pi05.openpi_adapter import load_openpi_policy

            policy = load_openpi_policy(ckpt, device=device)
        else:
            from pytest_duquant.policies.pi05.policy import load_policy

            policy = load_policy(ckpt, tokenizer=tokenizer, device=device, dtype=dtype)
        policy.fingerprint = fingerprint
        policy.ckpt_dir = ckpt if ckpt_dir is not None else None
        policy.preset = "fp" if manifest is None else manifest["preset"]
        return policy

    make.fingerprint = fingerprint
    make.quantized_manifest = manifest
    make.ckpt_dir = ckpt
    make.builtin = ckpt_dir is None
    return make


def default_calibration_observations(n: int = CALIB_OBS, seed: int = CALIB_OBS_SEED) -> list[dict]:
    from pytest_duquant.policies.pi05.processing import synthetic_observations

    return synthetic_observations(n, seed)


def run_calibration_calls(policy, observations: Sequence[dict], calls: int) -> None:
    """`calls` real policy calls: call i runs observation i mod len(observations) with noise seed
    CALIB_NOISE_SEED + i (10 denoising steps each)."""
    if not observations:
        raise ValueError("calibration needs at least one observation")
    for i in progress.steps(range(calls), "calibration", unit="policy calls"):
        policy.infer(observations[i % len(observations)], CALIB_NOISE_SEED + i)


def quantize_and_calibrate(policy, config: DuQuantConfig, observations: Sequence[dict] | None = None):
    """Quantize the policy's model under `config`, then calibrate on CALIB_STEPS real policy calls.

    observations: the calibration observations (default: CALIB_OBS synthetic ones; LIBERO resets when the
    caller has them). Returns (policy, QuantReport); the policy is changed in place.
    """
    model = policy_module(policy)
    manifest = getattr(policy, "quantized_manifest", None)
    if manifest is not None:  # a quantized checkpoint: used as saved when the settings match, never re-quantized
        from pytest_duquant.policies.pi05 import quantized_checkpoint as qc

        try:
            qc.check_config(manifest, config, where=f"--ckpt {policy.ckpt_dir}")
        except qc.CheckpointError as exc:
            raise SessionPolicyError(str(exc)) from None
        qc.replace_backend(model, config.backend)
        return policy, QuantReport(preset=config.preset, dryrun=False, config=config.describe(),
                                   plan=linear_choices(model, config))
    report = quantize_model(model, config)
    if config.enabled and not report.dryrun and report.layers:
        obs = list(observations) if observations is not None else default_calibration_observations()
        with reuse_prefix(policy), calibration(model):
            run_calibration_calls(policy, obs, config.calib_steps)
    policy.preset = config.preset if config.enabled else "fp"
    return policy, report


# ---- speed: reuse the (unquantized) prefix across calls -----------------------------------------
def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _prefix_signature(model: nn.Module) -> tuple | None:
    """Identity of every module on the prefix path, or None when a quantized layer lies there (then every
    call must really run, e.g. to be observed by calibration)."""
    pwe = getattr(model, "paligemma_with_expert", None)
    vlm = getattr(pwe, "paligemma", None)
    if vlm is None:
        return None
    sig = []
    for name, module in vlm.named_modules():
        if hasattr(module, "calibrating"):  # a DuQuant / RTN layer on the prefix path
            return None
        sig.append((name, id(module)))
    return tuple(sig)


@contextlib.contextmanager
def reuse_prefix(policy, max_entries: int = 64) -> Iterator[None]:
    """Memoise the prefix (image + prompt embeddings, language-model KV cache) by input content.

    Only the action expert runs per denoising step; the prefix depends on the VLM alone. The memo is keyed
    by the inputs' bytes and the identity of every VLM module, and switches itself off when any quantized
    layer is on the prefix path, so results are identical to running without it (tests check this).
    """
    try:
        model = policy_module(policy)
    except SessionPolicyError:
        yield
        return
    if not (hasattr(model, "embed_prefix") and hasattr(model, "compute_prefix_cache")) or (
        "embed_prefix" in vars(model) or "compute_prefix_cache" in vars(model)
    ):
        yield  # nothing to memoise, or already inside reuse_prefix / patched by someone else
        return
    orig_embed, orig_cache = model.embed_prefix, model.compute_prefix_cache
    memo: dict = {}

    def lookup(kind, fn, args):
        sig = _prefix_signature(model)
        if sig is None:
            return fn(*args)
        key = (kind, _digest(*args), hash(sig), str(getattr(model, "compute_dtype", "")))
        if key not in memo:
            if len(memo) >= max_entries:
                memo.pop(next(iter(memo)))
            memo[key] = fn(*args)
        return memo[key]

    def embed_prefix(images, image_masks, tokens, token_masks):
        return lookup("embed", orig_embed, (images, image_masks, tokens, token_masks))

    def compute_prefix_cache(prefix_embs, prefix_pad):
        return lookup("cache", orig_cache, (prefix_embs, prefix_pad))

    model.embed_prefix, model.compute_prefix_cache = embed_prefix, compute_prefix_cache
    try:
        yield
    finally:
        del model.embed_prefix, model.compute_prefix_cache
        memo.clear()


def _random_model(variant: str, seed: int, dtype: str | None, device: str = "cpu", draw_on_device: bool = False):
    """(config, precision, model) of a random-init pi0.5 variant: the same weights for the same seed anywhere
    (unless ``draw_on_device``: modeling.random_model)."""
    from pytest_duquant.policies.pi05.configuration import variant_config
    from pytest_duquant.policies.pi05.modeling import random_model

    config = variant_config(variant)
    precision = dtype or config.precision
    config = config.replace(precision=precision, extras={"random_init_seed": int(seed)})
    return config, precision, random_model(config, seed, precision, device=device, draw_on_device=draw_on_device)


def init_checkpoint(out_dir, variant: str = "dummy", seed: int = 0, dtype: str | None = None) -> Path:
    """Write a random-init checkpoint in openpi's PyTorch layout (model.safetensors, config.json, LIBERO-like
    norm stats, a tiny SentencePiece tokenizer): `duquant init-checkpoint` and the built-in default."""
    from pytest_duquant.policies.pi05.checkpoint import random_norm_stats, save_checkpoint
    from pytest_duquant.policies.pi05.tokenizer import CKPT_TOKENIZER_NAME, tiny_tokenizer_proto

    _, precision, model = _random_model(variant, seed, dtype)
    out = save_checkpoint(model, random_norm_stats(seed), out_dir, precision=precision)
    (out / CKPT_TOKENIZER_NAME).write_bytes(tiny_tokenizer_proto())
    return out


def random_fingerprint(variant: str, seed: int, precision: str, draw_on_device: bool = False) -> str:
    """The label a random policy carries instead of a checkpoint fingerprint (no file to hash)."""
    return f"random-{variant}-{'device-' if draw_on_device else ''}seed{seed}-{precision}"


def random_policy(
    variant: str = "pi05", seed: int = 0, dtype: str | None = None, device: str = "cpu", draw_on_device: bool = False
):
    """A random-init policy built in memory (no checkpoint written; the full-size one needs ~7 GB in bf16).

    Same weights as `duquant init-checkpoint --variant V --seed N`; its fingerprint is the label
    `random-<variant>-seed<N>-<dtype>` (no file to hash). ``draw_on_device``: values drawn on the device
    (fast; other values, labelled `random-<variant>-device-seed<N>-<dtype>`): for timing."""
    from pytest_duquant.policies.pi05.checkpoint import random_norm_stats
    from pytest_duquant.policies.pi05.policy import Pi05Policy
    from pytest_duquant.policies.pi05.tokenizer import PaligemmaTokenizer, tiny_tokenizer_proto

    config, precision, model = _random_model(variant, seed, dtype, device, draw_on_device)
    tok = PaligemmaTokenizer(None, config.max_token_len, model_proto=tiny_tokenizer_proto())
    policy = Pi05Policy(
        model, random_norm_stats(seed), tok, device=device, source=f"random:{variant}:seed={seed}"
    )
    policy.fingerprint = random_fingerprint(variant, seed, precision, draw_on_device)
    policy.ckpt_dir = None
    policy.preset = "fp"
    return policy
