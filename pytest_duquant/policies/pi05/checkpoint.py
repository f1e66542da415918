"""Load / save pi0.5 checkpoints: openpi PyTorch layout and lerobot `save_pretrained` layout.

openpi layout (examples/convert_jax_model_to_pytorch.py, policies/policy_config.py):
    model.safetensors            keys `paligemma_with_expert.…`, `action_in_proj.…`, `time_mlp_in.…`, …
                                 (written by safetensors.save_model: the tied `paligemma.lm_head.weight` may
                                 stand for `…language_model.embed_tokens.weight`;
                                 `gemma_expert.lm_head.weight`
                                 is present but unused)
    config.json                  {action_dim, action_horizon, paligemma_variant, action_expert_variant,
                                  precision}
    assets/<asset_id>/norm_stats.json   {"norm_stats": {"state": {mean, std, q01, q99}, "actions": {…}}}
                                 (pi05_libero: asset_id "physical-intelligence/libero"; the converter copies
                                 assets only when they sit beside the JAX checkpoint, so they can be missing)
lerobot layout (lerobot policies/pi05, processor/pipeline.py, processor/normalize_processor.py):
    config.json                  {"type": "pi05", chunk_size, max_action_dim, paligemma_variant, …,
                                  input_features,
                                  output_features, tokenizer_max_length, num_inference_steps, dtype}
    model.safetensors            the same keys under a `model.` prefix
    policy_preprocessor.json     steps; the "normalizer_processor" step's "state_file" holds
                                 `observation.state.q01/q99`, `action.q01/q99` (flat safetensors)
    policy_postprocessor.json    the "unnormalizer_processor" step with the action stats
Layout is detected by files: `policy_preprocessor.json` or config.json "type" -> lerobot; otherwise openpi.
Every problem raises CheckpointError naming the file/key with expected vs found; nothing falls back to
random weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pytest_duquant.policies.pi05.configuration import (
    OPENPI_LIBERO_ASSET_ID,
    Pi05Config,
    Pi05ConfigError,
    variant_config,
)
from pytest_duquant.policies.pi05.errors import CheckpointError
from pytest_duquant.policies.pi05.modeling import Pi05Model, build_model
from pytest_duquant.policies.pi05.processing import NormStats, QuantileStats

log = logging.getLogger("duquant")

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
LEROBOT_PRE = "policy_preprocessor.json"
LEROBOT_POST = "policy_postprocessor.json"
LEROBOT_PREFIX = "model."
EMBED_KEY = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
PALIGEMMA_LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
EXPERT_LM_HEAD = "paligemma_with_expert.gemma_expert.lm_head.weight"
# Keys of openpi's module tree that inference never uses (we do not build them; accepted, ignored).
UNUSED_KEYS = (PALIGEMMA_LM_HEAD, EXPERT_LM_HEAD)
PI0_ONLY_KEYS = ("state_proj.weight", "action_time_mlp_in.weight")


def _lazy_safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as exc:  # pragma: no cover
        raise CheckpointError("reading/writing checkpoints needs the 'safetensors' package") from exc
    return safe_open, save_file


# ------------------------------------------------------------------------------------------------
# Layout detection and config
# ------------------------------------------------------------------------------------------------
def detect_layout(ckpt_dir: str | os.PathLike) -> str:
    """'openpi' or 'lerobot', from the files present; CheckpointError when not a checkpoint directory."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d}: not a directory")
    if not (d / WEIGHTS_NAME).is_file():
        present = sorted(p.name for p in d.iterdir())[:20]
        raise CheckpointError(
            f"checkpoint {d}: no weights file {WEIGHTS_NAME} (expected an openpi PyTorch or lerobot pi0.5 "
            f"directory); found {present}"
        )
    if (d / LEROBOT_PRE).is_file():
        return "lerobot"
    cfg = d / CONFIG_NAME
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and data.get("type") in ("pi05", "pi0", "pi0_fast", "smolvla"):
            return "lerobot"
    return "openpi"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes in a safetensors file (header only)."""
    safe_open, _ = _lazy_safetensors()
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _strip_prefix(shapes: dict, layout: str) -> dict:
    if layout != "lerobot":
        return shapes
    return {(k[len(LEROBOT_PREFIX) :] if k.startswith(LEROBOT_PREFIX) else k): v for k, v in shapes.items()}


def _config_from_weights(shapes: dict[str, tuple[int, ...]], path: Path) -> Pi05Config:
    """openpi training checkpoints may lack config.json: infer the variant from tensor shapes."""
    key = "paligemma_with_expert.gemma_expert.model.layers.0.self_attn.o_proj.weight"
    if key not in shapes:
        raise CheckpointError(f"{path}: cannot infer the pi0.5 variant without config.json (no key {key})")
    width = shapes[key][0]
    for name in ("pi05", "dummy"):
        cfg = variant_config(name)
        if cfg.expert.width == width:
            log.warning(
                "%s: no config.json; inferred variant %r from weights, action_horizon %d (pi05_libero)",
                path.parent,
                name,
                cfg.action_horizon,
            )
            return cfg.replace(precision="bfloat16") if name == "pi05" else cfg
    raise CheckpointError(f"{path}: expert width {width} matches no known variant (pi05: 1024, dummy: 64)")


def read_config(ckpt_dir: str | os.PathLike, layout: str | None = None) -> Pi05Config:
    d = Path(ckpt_dir)
    layout = layout or detect_layout(d)
    cfg_path = d / CONFIG_NAME
    if layout == "lerobot":
        return _lerobot_config(_read_json(cfg_path), cfg_path)
    if not cfg_path.is_file():
        return _config_from_weights(weight_shapes(d / WEIGHTS_NAME), d / WEIGHTS_NAME)
    try:
        return Pi05Config.from_json_dict(_read_json(cfg_path), source=str(cfg_path))
    except (Pi05ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(str(exc)) from exc


def _lerobot_config(data: dict, path: Path) -> Pi05Config:
    if data.get("type") != "pi05":
        raise CheckpointError(
            f"{path}: \"type\" is {data.get('type')!r}; only lerobot 'pi05' checkpoints are supported"
        )
    if data.get("use_relative_actions"):
        raise CheckpointError(
            f"{path}: \"use_relative_actions\" is true: this policy predicts actions relative to the current "
            "state, which lerobot's processor turns back into absolute actions. pytest-duquant's pi0.5 does not "
            "implement that conversion, so it would send relative actions to the environment as if they were "
            "absolute; it refuses the checkpoint instead. Use a checkpoint trained with absolute actions."
        )
    res = tuple(data.get("image_resolution") or (224, 224))
    if res != (224, 224):
        raise CheckpointError(f"{path}: image_resolution {list(res)}; only [224, 224] is supported")
    feats = data.get("input_features") or {}
    visual = [k for k, v in feats.items() if isinstance(v, dict) and v.get("type") == "VISUAL"]
    if not visual:
        raise CheckpointError(f"{path}: input_features has no VISUAL feature (found {sorted(feats)})")
    n_empty = int(data.get("empty_cameras", 0) or 0)
    image_keys = tuple(visual) + tuple(f"observation.images.empty_camera_{i}" for i in range(n_empty))
    image_present = tuple(i < 2 for i in range(len(visual))) + (False,) * n_empty
    out = (data.get("output_features") or {}).get("action", {})
    out_dim = int((out.get("shape") or [7])[0])
    try:
        base = variant_config(_variant_from_pair(data, path))
        return base.replace(
            paligemma_variant=data.get("paligemma_variant", "gemma_2b"),
            action_expert_variant=data.get("action_expert_variant", "gemma_300m"),
            action_dim=int(data.get("max_action_dim", 32)),
            action_horizon=int(data.get("chunk_size", 50)),
            max_token_len=int(data.get("tokenizer_max_length", 200)),
            num_steps=int(data.get("num_inference_steps", 10)),
            image_keys=image_keys,
            image_present=image_present,
            discrete_state_input=True,
            prompt_format="lerobot",
            norm_convention="lerobot",
            output_action_dim=out_dim,
            precision=str(data.get("dtype", "float32")),
            extras=dict(data.get("pytest_duquant") or {}),
        )
    except Pi05ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _variant_from_pair(data: dict, path: Path) -> str:
    pair = (data.get("paligemma_variant", "gemma_2b"), data.get("action_expert_variant", "gemma_300m"))
    if pair == ("gemma_2b", "gemma_300m"):
        return "pi05"
    if pair == ("dummy", "dummy"):
        return "dummy"
    raise CheckpointError(
        f"{path}: paligemma_variant/action_expert_variant {pair} is not a known pi0.5 variant"
    )


# ------------------------------------------------------------------------------------------------
# Norm stats
# ------------------------------------------------------------------------------------------------
def _quantiles(entry: Any, where: str) -> QuantileStats:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected an object with q01/q99, found {type(entry).__name__}")
    missing = [k for k in ("q01", "q99") if entry.get(k) is None]
    if missing:
        raise CheckpointError(
            f"{where}: missing {missing} (pi0.5 uses quantile normalization; found keys {sorted(entry)})"
        )
    q01 = np.asarray(entry["q01"], dtype=np.float64)
    q99 = np.asarray(entry["q99"], dtype=np.float64)
    if q01.shape != q99.shape or q01.ndim != 1:
        raise CheckpointError(f"{where}: q01 shape {q01.shape} and q99 shape {q99.shape} must be equal 1-D")
    mean = np.asarray(entry["mean"], dtype=np.float64) if entry.get("mean") is not None else None
    std = np.asarray(entry["std"], dtype=np.float64) if entry.get("std") is not None else None
    return QuantileStats(q01=q01, q99=q99, mean=mean, std=std)


def find_norm_stats_file(ckpt_dir: str | os.PathLike, asset_id: str | None = None) -> Path:
    d = Path(ckpt_dir)
    assets = d / "assets"
    if asset_id is not None:
        path = assets / asset_id / "norm_stats.json"
        if not path.is_file():
            raise CheckpointError(f"norm stats {path}: missing (asset_id {asset_id!r})")
        return path
    found = sorted(assets.rglob("norm_stats.json")) if assets.is_dir() else []
    if not found:
        raise CheckpointError(
            f"norm stats missing: no {assets}/<asset_id>/norm_stats.json (openpi's JAX->PyTorch converter "
            f"copies assets only when they sit beside the JAX checkpoint; copy them from the JAX "
            f"checkpoint's assets/, for pi05_libero assets/{OPENPI_LIBERO_ASSET_ID}/norm_stats.json)"
        )
    if len(found) > 1:
        preferred = assets / OPENPI_LIBERO_ASSET_ID / "norm_stats.json"
        if preferred in found:
            return preferred
        raise CheckpointError(
            f"several norm stats under {assets}: {[str(p.relative_to(assets).parent) for p in found]}; "
            "choose one with asset_id"
        )
    return found[0]


def read_openpi_norm_stats(path: Path) -> NormStats:
    data = _read_json(path)
    stats = data.get("norm_stats") if isinstance(data, dict) else None
    if not isinstance(stats, dict):
        raise CheckpointError(
            f'{path}: expected {{"norm_stats": {{...}}}}, found '
            f"{sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )
    for key in ("state", "actions"):
        if key not in stats:
            raise CheckpointError(f"{path}: norm_stats has no {key!r} entry (found {sorted(stats)})")
    return NormStats(
        state=_quantiles(stats["state"], f"{path}: norm_stats.state"),
        actions=_quantiles(stats["actions"], f"{path}: norm_stats.actions"),
        convention="openpi",
        source=str(path),
    )


def _lerobot_step_stats(
    ckpt: Path, pipeline_file: str, registry: str
) -> tuple[dict[str, np.ndarray], dict, Path]:
    pipe_path = ckpt / pipeline_file
    pipe = _read_json(pipe_path)
    steps = pipe.get("steps", []) if isinstance(pipe, dict) else []
    for step in steps:
        if step.get("registry_name") == registry:
            state_file = step.get("state_file")
            if not state_file:
                raise CheckpointError(
                    f"{pipe_path}: step {registry!r} has no state_file (normalization stats)"
                )
            path = ckpt / state_file
            if not path.is_file():
                raise CheckpointError(f"norm stats {path}: missing (named by {pipe_path} step {registry!r})")
            safe_open, _ = _lazy_safetensors()
            with safe_open(str(path), framework="pt") as f:
                flat = {k: f.get_tensor(k).double().numpy() for k in f.keys()}
            return flat, step.get("config") or {}, path
    raise CheckpointError(
        f"{pipe_path}: no {registry!r} step (found {[s.get('registry_name') for s in steps]})"
    )


def read_lerobot_norm_stats(ckpt_dir: str | os.PathLike) -> NormStats:
    d = Path(ckpt_dir)
    flat, cfg, path = _lerobot_step_stats(d, LEROBOT_PRE, "normalizer_processor")
    norm_map = cfg.get("norm_map") or {}
    for ft in ("STATE", "ACTION"):
        mode = norm_map.get(ft, "QUANTILES")
        if mode != "QUANTILES":
            raise CheckpointError(f"{d / LEROBOT_PRE}: norm_map[{ft}] is {mode!r}; pi0.5 uses 'QUANTILES'")

    def get(prefix: str, src: dict, where: Path) -> QuantileStats:
        entry = {k.rsplit(".", 1)[1]: v for k, v in src.items() if k.rsplit(".", 1)[0] == prefix}
        return _quantiles(entry, f"{where}: {prefix}")

    state = get("observation.state", flat, path)
    try:
        post, _, post_path = _lerobot_step_stats(d, LEROBOT_POST, "unnormalizer_processor")
        actions = get("action", post, post_path)
    except CheckpointError:
        actions = get("action", flat, path)
    return NormStats(state=state, actions=actions, convention="lerobot", source=str(path))


def read_norm_stats(
    ckpt_dir: str | os.PathLike, layout: str | None = None, asset_id: str | None = None
) -> NormStats:
    layout = layout or detect_layout(ckpt_dir)
    if layout == "lerobot":
        return read_lerobot_norm_stats(ckpt_dir)
    return read_openpi_norm_stats(find_norm_stats_file(ckpt_dir, asset_id))


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def _fmt_keys(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(model: Pi05Model, shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, str]:
    """Compare file keys/shapes with the model; return {model key: file key}. CheckpointError on mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if any(k in shapes for k in PI0_ONLY_KEYS):
        raise CheckpointError(
            f"{path}: a pi0 checkpoint (has {[k for k in PI0_ONLY_KEYS if k in shapes]}); "
            "only pi0.5 is supported"
        )
    mapping = {k: k for k in shapes if k in expected}
    if EMBED_KEY in expected and EMBED_KEY not in shapes and PALIGEMMA_LM_HEAD in shapes:
        mapping[EMBED_KEY] = PALIGEMMA_LM_HEAD  # tied weights saved once under the lm_head name
    missing = [k for k in expected if k not in mapping]
    unexpected = [k for k in shapes if k not in expected and k not in UNUSED_KEYS]
    variant = model.config.variant
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) that variant {variant!r} needs: {_fmt_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_fmt_keys(unexpected)}")
    bad = [
        f"{k}: expected {list(expected[k])}, found {list(shapes[f])}"
        for k, f in sorted(mapping.items())
        if tuple(shapes[f]) != expected[k]
    ]
    if bad:
        problems.append(
            f"{len(bad)} shape mismatch(es): " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
        )
    if problems:
        raise CheckpointError(f"{path}: " + " | ".join(problems))
    return mapping


def embedding_rows(ckpt_dir: str | os.PathLike, layout: str) -> tuple[int, Path] | None:
    """(rows of the language model's token embedding, weights file), from the file's header; None if absent."""
    path = Path(ckpt_dir) / WEIGHTS_NAME
    shapes = _strip_prefix(weight_shapes(path), layout)
    for key in (EMBED_KEY, PALIGEMMA_LM_HEAD):
        if key in shapes:
            return int(shapes[key][0]), path
    return None


def check_tokenizer_vocab(tokenizer, ckpt_dir: str | os.PathLike, layout: str, config: Pi05Config) -> None:
    """The tokenizer's vocabulary must be the one the checkpoint's embedding was trained with.

    A wrong tokenizer whose ids happen to be in range is accepted by the model and silently turns every
    prompt into other tokens (every episode fails). The one exception: a random-init checkpoint
    (`duquant init-checkpoint`, config "random_init_seed") with a tokenizer no larger than its embedding:
    nothing was trained, so any in-range vocabulary is as good as another.
    """
    found = embedding_rows(ckpt_dir, layout)
    vocab = getattr(tokenizer, "vocab_size", None)
    if found is None or vocab is None:
        return
    rows, path = found
    if vocab == rows:
        return
    random_init = "random_init_seed" in config.extras
    if random_init and vocab <= rows:
        return
    where = getattr(tokenizer, "path", "the tokenizer")
    raise CheckpointError(
        f"tokenizer {where}: {vocab} pieces, but the token embedding in {path} has {rows} rows "
        f"(PaliGemma's tokenizer has 257152): it is not this checkpoint's tokenizer, and its token ids would "
        "mean other words to the model. Pass --tokenizer PATH/paligemma_tokenizer.model (or set "
        "OPENPI_TOKENIZER); openpi downloads it from gs://big_vision/paligemma_tokenizer.model."
    )


@torch.no_grad()
def load_weights(model: Pi05Model, path: str | os.PathLike, layout: str = "openpi") -> None:
    """Strictly load `path` into `model` (values cast to each parameter's dtype)."""
    path = Path(path)
    raw_shapes = weight_shapes(path)
    if layout == "lerobot":
        bare = [k for k in raw_shapes if not k.startswith(LEROBOT_PREFIX)]
        if bare:
            raise CheckpointError(
                f"{path}: lerobot layout expects every key under {LEROBOT_PREFIX!r}; not: {_fmt_keys(bare)}"
            )
    shapes = _strip_prefix(raw_shapes, layout)
    mapping = check_keys(model, shapes, path)
    prefix = LEROBOT_PREFIX if layout == "lerobot" else ""
    state = model.state_dict()
    read_into(path, {prefix + file_key: state[key] for key, file_key in mapping.items()})


_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_exactly(f, buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        n = f.readinto(buf[done:])
        if not n:
            raise CheckpointError(f"{f.name}: truncated (file ends inside a tensor)")
        done += n


@torch.no_grad()
def read_into(path: str | os.PathLike, targets: dict[str, torch.Tensor]) -> None:
    """Fill each target tensor with the file tensor of that name, reading the file sequentially.

    No memory map and no full copy of the file: a tensor whose file dtype is the target's (bf16 -> bf16)
    is read straight into the target's memory; any other is read into a temporary of its own size and
    cast. Resident memory stays the model plus the largest such tensor (reading through safetensors'
    memory map kept every page of the file resident next to the model: peak about twice the model).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (shorter than its header)")
        size = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        base = 8 + size
        order = sorted(targets, key=lambda k: header[k]["data_offsets"][0])
        for name in order:
            info, target = header[name], targets[name]
            begin, end = info["data_offsets"]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            shape = tuple(info["shape"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which is not supported")
            if shape != tuple(target.shape):
                raise CheckpointError(f"{path}: {name}: expected {list(target.shape)}, found {list(shape)}")
            direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
            buf = target if direct else torch.empty(shape, dtype=dtype)
            if end - begin != buf.numel() * buf.element_size():
                raise CheckpointError(f"{path}: tensor {name}: {end - begin} bytes for shape {list(shape)}")
            f.seek(base + begin)
            if buf.numel():
                _read_exactly(f, memoryview(buf.reshape(-1).view(torch.uint8).numpy()))
            if not direct:
                target.copy_(buf)


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    asset_id: str | None = None,
    config_overrides: dict | None = None,
):
    """-> (model, config, norm_stats, layout). Config and norm stats are checked before weights are read."""
    d = Path(ckpt_dir)
    layout = detect_layout(d)
    config = read_config(d, layout)
    if config_overrides:
        config = config.replace(**config_overrides)
    norm_stats = read_norm_stats(d, layout, asset_id)
    precision = serving_precision(config, dtype)
    if precision != config.precision:
        log.info("%s: stored as %s, served in %s (%s)", d, config.precision, precision,
                 "asked" if dtype is not None or os.environ.get(DTYPE_VARIABLE) else "openpi serves pi05 in bf16")
    model = build_model(config, device="meta", precision=precision)
    model.to_empty(device=device)
    model.set_precision(precision)  # recomputes RoPE buffers on the real device
    load_weights(model, d / WEIGHTS_NAME, layout)
    # openpi's create_trained_policy calls to_bfloat16_for_selected_params("bfloat16") after loading: the
    # parameters kept in float32 (norms, adaRMS dense, patch/pos embeddings) end up rounded through bf16.
    model.set_precision(precision)
    return model.eval(), config, norm_stats, layout


DTYPE_VARIABLE = "DUQUANT_POLICY_DTYPE"


def serving_precision(config: Pi05Config, dtype=None) -> str:
    """The precision a checkpoint is served in: `dtype` when asked (argument, else $DUQUANT_POLICY_DTYPE);
    otherwise bfloat16 for the full `pi05` variant, as openpi serves pi05_libero whatever precision its
    config.json records (the converter may write float32), and the variant's own precision for tiny ones
    (`dummy`: float32)."""
    if dtype is None:
        dtype = os.environ.get(DTYPE_VARIABLE) or None
    if dtype is None:
        return "bfloat16" if config.variant == "pi05" else config.precision
    return _precision(dtype, config)


def _precision(dtype, config: Pi05Config) -> str:
    if dtype is None:
        return config.precision
    if isinstance(dtype, str):
        dtype = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
        }.get(dtype, dtype)
    if dtype == torch.float32:
        return "float32"
    if dtype == torch.bfloat16:
        return "bfloat16"
    raise CheckpointError(f"dtype {dtype!r} (argument or ${DTYPE_VARIABLE}): must be float32 or bfloat16")


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous in a storage of its own: a model whose fast-path projections are fused holds its q/k/v
    and gate/up weights as views of one tensor, and safetensors refuses shared storage (before 0.4 any; since,
    overlapping only). Copies only such views."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _export_state(model: Pi05Model, precision: str, include_expert_lm_head: bool) -> dict[str, torch.Tensor]:
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    out = {k: _own_storage(v.detach().to("cpu", dtype)) for k, v in model.state_dict().items()}
    if include_expert_lm_head:  # openpi's module tree has it; its strict safetensors.load_model needs it
        cfg = model.config
        out[EXPERT_LM_HEAD] = torch.zeros(cfg.vocab_size, cfg.expert.width, dtype=dtype)
    return out


def save_checkpoint(
    model: Pi05Model,
    norm_stats: NormStats,
    out_dir: str | os.PathLike,
    *,
    layout: str = "openpi",
    precision: str | None = None,
    asset_id: str = OPENPI_LIBERO_ASSET_ID,
    tokenizer_path: str | os.PathLike | None = None,
    include_expert_lm_head: bool | None = None,
) -> Path:
    """Write a checkpoint directory (openpi layout by default; 'lerobot' for tests/interop)."""
    _, save_file = _lazy_safetensors()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    precision = precision or config.precision
    config = config.replace(precision=precision)
    if include_expert_lm_head is None:  # only the full model can be built by openpi itself
        include_expert_lm_head = layout == "openpi" and config.variant == "pi05"
    state = _export_state(model, precision, include_expert_lm_head)
    if layout == "openpi":
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / CONFIG_NAME).write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
        stats_path = out / "assets" / asset_id / "norm_stats.json"
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        stats_path.write_text(json.dumps(norm_stats.to_openpi_json(), indent=2) + "\n")
    elif layout == "lerobot":
        save_file(
            {LEROBOT_PREFIX + k: v for k, v in state.items()},
            str(out / WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        _write_lerobot_files(out, config, norm_stats)
    else:
        raise CheckpointError(f"layout={layout!r}: must be 'openpi' or 'lerobot'")
    if tokenizer_path is not None:
        (out / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    return out


def _write_lerobot_files(out: Path, config: Pi05Config, stats: NormStats) -> None:
    _, save_file = _lazy_safetensors()
    state_dim = int(stats.state.q01.shape[0])
    act_dim = int(stats.actions.q01.shape[0])
    visual = [k for k, p in zip(config.image_keys, config.image_present, strict=True) if p]
    if not visual or visual[0].startswith("base_0"):
        visual = ["observation.images.image", "observation.images.image2"]
    features = {k: {"type": "VISUAL", "shape": [3, 256, 256]} for k in visual}
    features["observation.state"] = {"type": "STATE", "shape": [state_dim]}
    cfg = {
        "type": "pi05",
        "paligemma_variant": config.paligemma_variant,
        "action_expert_variant": config.action_expert_variant,
        "dtype": config.precision,
        "chunk_size": config.action_horizon,
        "n_action_steps": config.action_horizon,
        "max_state_dim": 32,
        "max_action_dim": config.action_dim,
        "num_inference_steps": config.num_steps,
        "tokenizer_max_length": config.max_token_len,
        "image_resolution": [224, 224],
        "empty_cameras": 0,
        "input_features": features,
        "output_features": {"action": {"type": "ACTION", "shape": [act_dim]}},
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"},
    }
    if config.extras:  # e.g. random_init_seed of a `duquant init-checkpoint` checkpoint
        cfg["pytest_duquant"] = dict(config.extras)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")

    def flat(prefix: str, s: QuantileStats) -> dict[str, torch.Tensor]:
        d = {
            f"{prefix}.q01": torch.tensor(s.q01, dtype=torch.float32),
            f"{prefix}.q99": torch.tensor(s.q99, dtype=torch.float32),
        }
        if s.mean is not None:
            d[f"{prefix}.mean"] = torch.tensor(s.mean, dtype=torch.float32)
        if s.std is not None:
            d[f"{prefix}.std"] = torch.tensor(s.std, dtype=torch.float32)
        return d

    norm_cfg = {
        "eps": 1e-8,
        "features": {**features, "action": {"type": "ACTION", "shape": [act_dim]}},
        "norm_map": {"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"},
    }
    pre_state = "policy_preprocessor_step_3_normalizer_processor.safetensors"
    save_file(
        {**flat("observation.state", stats.state), **flat("action", stats.actions)}, str(out / pre_state)
    )
    pre = {
        "name": "policy_preprocessor",
        "steps": [
            {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}},
            {"registry_name": "relative_actions_processor", "config": {"enabled": False}},
            {"registry_name": "normalizer_processor", "config": norm_cfg, "state_file": pre_state},
            {"registry_name": "pi05_prepare_state_tokenizer_processor_step", "config": {"max_state_dim": 32}},
            {
                "registry_name": "tokenizer_processor",
                "config": {
                    "tokenizer_name": "google/paligemma-3b-pt-224",
                    "max_length": config.max_token_len,
                    "padding_side": "right",
                    "padding": "max_length",
                },
            },
            {"registry_name": "device_processor", "config": {"device": "cpu"}},
        ],
    }
    (out / LEROBOT_PRE).write_text(json.dumps(pre, indent=2) + "\n")
    post_state = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    save_file(flat("action", stats.actions), str(out / post_state))
    post = {
        "name": "policy_postprocessor",
        "steps": [
            {"registry_name": "unnormalizer_processor", "config": norm_cfg, "state_file": post_state},
            {"registry_name": "device_processor", "config": {"device": "cpu"}},
        ],
    }
    (out / LEROBOT_POST).write_text(json.dumps(post, indent=2) + "\n")


def random_norm_stats(seed: int = 0, state_dim: int = 8, action_dim: int = 7) -> NormStats:
    """Plausible LIBERO-like quantile stats for random-weight checkpoints (deterministic)."""
    rng = np.random.default_rng(seed)
    s_lo = rng.uniform(-1.0, -0.1, size=state_dim)
    a_lo = rng.uniform(-1.0, -0.3, size=action_dim)
    a_lo[-1] = -1.0
    return NormStats(
        state=QuantileStats(q01=s_lo, q99=s_lo + rng.uniform(0.3, 2.0, size=state_dim)),
        actions=QuantileStats(
            q01=a_lo, q99=np.concatenate([-a_lo[:-1] + rng.uniform(0, 0.2, action_dim - 1), [1.0]])
        ),
        convention="openpi",
    )
