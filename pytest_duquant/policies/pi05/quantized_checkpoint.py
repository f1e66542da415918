"""Quantized pi0.5 checkpoints: save a quantized, calibrated policy; load it without re-quantizing or
re-calibrating (docs/quantized-checkpoints.md).

A quantized checkpoint is a folder:
    duquant_quantized.json   the manifest: format and version, the FP checkpoint's fingerprint, the DuQuant
                             settings, each quantized layer's settings, the tensors file's sha256 and size
    quantized.safetensors    every tensor of the deployed model (deploy.PackedDuQuantLinear): the packed weight
                             codes, weight scales, transforms, calibrated activation scales of the quantized
                             layers, and the unquantized parameters; its header metadata repeats the format
                             version and the FP fingerprint
    config.json, norm stats, tokenizer, ...   copied from the FP checkpoint (everything but its weights file)

    save_quantized(policy, out_dir, config=..., fp_ckpt=..., fp_fingerprint=...)
    load_quantized(ckpt_dir, tokenizer=None, device="cpu")  -> (model, norm_stats, tokenizer, layout, manifest)

`load_policy` and `policy_factory` recognise the folder by its manifest, so `--ckpt DIR` works wherever an FP
checkpoint does. Every problem raises CheckpointError with one line naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from pytest_duquant.policies.pi05.errors import CheckpointError

FORMAT = "pytest-duquant quantized pi0.5"
FORMAT_VERSION = 1
MANIFEST_NAME = "duquant_quantized.json"
TENSORS_NAME = "quantized.safetensors"
FP_WEIGHTS_NAME = "model.safetensors"
# The settings that change what a quantized layer computes; a run asking for other values cannot use the
# checkpoint (the backend only chooses kernels and may differ).
NUMERIC_SETTINGS = ("scope", "include", "exclude", "layers", "include_action_head", "wbits_default", "wbits",
                    "abits", "act_pct", "calib_steps", "block", "block_out", "ls", "permute", "row_rot",
                    "act_dynamic", "rotation")


def is_quantized_checkpoint(ckpt_dir: str | os.PathLike) -> bool:
    return (Path(ckpt_dir) / MANIFEST_NAME).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def numeric_settings(config) -> dict:
    """The DuQuantConfig values that change the quantized numerics, JSON-ready."""
    out = {}
    for name in NUMERIC_SETTINGS:
        value = getattr(config, name)
        out[name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
    return out


# ---- save -------------------------------------------------------------------------------------------------
def save_quantized(policy, out_dir: str | os.PathLike, *, config, fp_ckpt: str | os.PathLike,
                   fp_fingerprint: str, calibration: str = "") -> Path:
    """Write `policy` (quantized and calibrated under `config`, from the FP checkpoint `fp_ckpt`) to `out_dir`.

    The policy's quantized layers are deployed in place first (deploy.deploy_model: packed codes only).
    CheckpointError when there is nothing quantized, a static activation scale is not calibrated, or
    `out_dir` holds an FP checkpoint."""
    from safetensors.torch import save_file

    from pytest_duquant.deploy import PackedDuQuantLinear, deploy_model, resident_bytes

    out, src = Path(out_dir), Path(fp_ckpt)
    if (out / FP_WEIGHTS_NAME).exists():
        raise CheckpointError(f"{out}: holds an FP checkpoint ({FP_WEIGHTS_NAME}); choose an empty folder")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"{out}: is the FP checkpoint itself; choose another folder")
    model = policy.model
    deploy_model(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedDuQuantLinear)}
    if not layers:
        raise CheckpointError("nothing to save: the policy has no quantized layer (preset fp?)")
    raw = [n for n, m in layers.items() if m.act_quant_enabled and not m.act_dynamic and m.act_scale is None]
    if raw:
        raise CheckpointError(f"{len(raw)} layer(s) have no calibrated activation scale (e.g. {raw[0]}): "
                              "calibrate before saving, or the loaded policy would calibrate again")
    tensors, seen = {}, {}
    for key, t in model.state_dict().items():
        t = t.detach().to("cpu")
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        tensors[key] = t.clone().contiguous() if ptr in seen or not t.is_contiguous() or t.storage_offset() \
            or t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
        seen[ptr] = key
    out.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):  # config, norm stats, tokenizer, calibration observations, ...
        if item.name in (FP_WEIGHTS_NAME, MANIFEST_NAME, TENSORS_NAME):
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, out / item.name)
    if not (out / "config.json").is_file():
        (out / "config.json").write_text(json.dumps(model.config.to_json_dict(), indent=2) + "\n")
    tmp = out / f".{TENSORS_NAME}.tmp"
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                            "fp_fingerprint": fp_fingerprint})
    os.replace(tmp, out / TENSORS_NAME)
    precision = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(getattr(model, "compute_dtype", None),
                                                                           "float32")
    from pytest_duquant import __version__

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fp_fingerprint": fp_fingerprint,
        "fp_checkpoint": str(src),
        "layout": getattr(policy, "layout", "openpi"),
        "precision": precision,
        "preset": config.preset,
        "describe": config.describe(),
        "duquant": numeric_settings(config),
        "calibration": calibration,
        "layers": {n: {**m.settings(), "tensors": sorted(k for k, _ in m.state_dict().items())}
                   for n, m in layers.items()},
        "tensors": {"file": TENSORS_NAME, "sha256": _sha256(out / TENSORS_NAME),
                    "bytes": (out / TENSORS_NAME).stat().st_size},
        "resident_bytes": resident_bytes(model).to_dict(),
        "written_by": f"pytest-duquant {__version__}, torch {torch.__version__}",
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


# ---- load -------------------------------------------------------------------------------------------------
def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """The manifest, checked: format, version, the keys a loader needs (CheckpointError, one line)."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a quantized checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {data.get('format') if isinstance(data, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {data.get('format_version')!r}; this pytest-duquant reads "
                              f"version {FORMAT_VERSION} (quantize the FP checkpoint again with this version)")
    missing = [k for k in ("fp_fingerprint", "layout", "precision", "preset", "duquant", "layers", "tensors")
               if k not in data]
    if missing:
        raise CheckpointError(f"{path}: missing key(s) {', '.join(missing)}")
    return data


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            if size <= 0 or size > path.stat().st_size - 8:
                raise ValueError("shorter than its header")
            return json.loads(f.read(size))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def verify(ckpt_dir: str | os.PathLike, manifest: dict | None = None,
           expected_fp_fingerprint: str | None = None) -> dict:
    """Manifest and tensors file agree (version, FP fingerprint, size, sha256); returns the header."""
    d = Path(ckpt_dir)
    manifest = manifest or read_manifest(d)
    path = d / manifest["tensors"].get("file", TENSORS_NAME)
    header = _header(path)
    meta = header.get("__metadata__") or {}
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    fp = manifest["fp_fingerprint"]
    if meta.get("fp_fingerprint") != fp:
        raise CheckpointError(f"{path}: quantized from FP checkpoint {meta.get('fp_fingerprint')}, but {MANIFEST_NAME} "
                              f"says {fp}: the two files come from different checkpoints")
    if expected_fp_fingerprint is not None and fp != expected_fp_fingerprint:
        raise CheckpointError(f"{d}: quantized from FP checkpoint {fp}, not from {expected_fp_fingerprint}")
    size = path.stat().st_size
    if size != manifest["tensors"].get("bytes"):
        raise CheckpointError(f"{path}: {size} bytes, {MANIFEST_NAME} says {manifest['tensors'].get('bytes')} "
                              "(truncated or replaced)")
    if _sha256(path) != manifest["tensors"].get("sha256"):
        raise CheckpointError(f"{path}: sha256 differs from {MANIFEST_NAME} (damaged or replaced)")
    return header


def check_config(manifest: dict, config, where: str = "") -> None:
    """CheckpointError unless `config` asks for the numerics the checkpoint was quantized with."""
    stored = manifest["duquant"]
    asked = numeric_settings(config)
    diff = [f"{k}={asked.get(k)!r} (stored {stored.get(k)!r})"
            for k in NUMERIC_SETTINGS if asked.get(k) != stored.get(k)]
    if not config.enabled or diff:
        what = "preset fp (no quantization)" if not config.enabled else ", ".join(diff[:4])
        raise CheckpointError(
            f"{where or 'quantized checkpoint'}: quantized with preset {manifest['preset']}; this run asks for "
            f"{what}. Run it with the settings it was "
            "quantized with (e.g. --preset/--duquant-preset " + manifest["preset"] + "), or pass the FP checkpoint")


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def load_quantized(ckpt_dir: str | os.PathLike, tokenizer=None, device: str | torch.device = "cpu", dtype=None,
                   *, expected_fp_fingerprint: str | None = None):
    """-> (model, norm_stats, tokenizer, layout, manifest): the deployed quantized model, frozen scales loaded,
    nothing re-quantized or re-calibrated."""
    from pytest_duquant.deploy import PackedDuQuantLinear
    from pytest_duquant.policies.pi05.checkpoint import (
        EMBED_KEY,
        _fmt_keys,
        _precision,
        read_config,
        read_into,
        read_norm_stats,
    )
    from pytest_duquant.policies.pi05.modeling import build_model
    from pytest_duquant.policies.pi05.tokenizer import PaligemmaTokenizer, resolve_tokenizer_path
    from pytest_duquant.quantize import group_siblings, set_submodule

    d = Path(ckpt_dir)
    manifest = read_manifest(d)
    header = verify(d, manifest, expected_fp_fingerprint)
    layout = manifest["layout"]
    config = read_config(d, layout)
    norm_stats = read_norm_stats(d, layout, None)
    precision = manifest["precision"]
    if dtype is not None and _precision(dtype, config) != precision:
        raise CheckpointError(f"{d}: quantized in {precision}; it cannot be served in {_precision(dtype, config)}")
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = PaligemmaTokenizer(resolve_tokenizer_path(tokenizer, d), config.max_token_len)
    shapes = {k: v for k, v in header.items() if k != "__metadata__"}
    vocab = getattr(tokenizer, "vocab_size", None)
    if EMBED_KEY in shapes and vocab is not None and vocab != shapes[EMBED_KEY]["shape"][0] and not (
            "random_init_seed" in config.extras and vocab <= shapes[EMBED_KEY]["shape"][0]):
        raise CheckpointError(f"tokenizer: {vocab} pieces, but the token embedding in {d / TENSORS_NAME} has "
                              f"{shapes[EMBED_KEY]['shape'][0]} rows: not this checkpoint's tokenizer")
    model = build_model(config, device="meta", precision=precision)
    model.to_empty(device=device)
    model.set_precision(precision)
    absent = [f"{name}.{t}" for name, s in manifest["layers"].items() for t in s.get("tensors", ())
              if f"{name}.{t}" not in shapes]
    if absent:
        raise CheckpointError(f"{d / TENSORS_NAME}: {len(absent)} missing tensor(s): {_fmt_keys(absent)}")
    for name, settings in manifest["layers"].items():
        prefix = name + "."
        mine = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        settings = {k: v for k, v in settings.items() if k != "tensors"}
        try:
            model.get_submodule(name)
            layer = PackedDuQuantLinear.empty(settings, tensors={k: (tuple(v["shape"]), _DTYPES[v["dtype"]])
                                                                 for k, v in mine.items()}, device=device)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{d / MANIFEST_NAME}: layer {name}: cannot be rebuilt ({exc})") from None
        set_submodule(model, name, layer)
    state = model.state_dict()
    missing = [k for k in state if k not in shapes]
    unexpected = [k for k in shapes if k not in state]
    if missing or unexpected:
        raise CheckpointError(f"{d / TENSORS_NAME}: " + " | ".join(
            ([f"{len(missing)} missing tensor(s): {_fmt_keys(missing)}"] if missing else [])
            + ([f"{len(unexpected)} unexpected tensor(s): {_fmt_keys(unexpected)}"] if unexpected else [])))
    read_into(d / TENSORS_NAME, state)
    model.eval()
    if any(s.get("backend") == "triton" for s in manifest["layers"].values()):
        group_siblings(model)
    return model, norm_stats, tokenizer, layout, manifest


def label(policy, manifest: dict, ckpt_dir) -> object:
    """Attach what a run records to a loaded quantized policy: the FP fingerprint (goldens are the FP
    checkpoint's), the preset, and the manifest."""
    policy.fingerprint = manifest["fp_fingerprint"]
    policy.preset = manifest["preset"]
    policy.quantized_manifest = manifest
    policy.ckpt_dir = Path(ckpt_dir)
    return policy


def replace_backend(model, backend: str) -> None:
    """Run the loaded layers on `backend` (a kernel choice; the numerics are the checkpoint's)."""
    from pytest_duquant.deploy import PackedDuQuantLinear
    from pytest_duquant.quantize import group_siblings

    for m in model.modules():
        if isinstance(m, PackedDuQuantLinear):
            m.backend = backend
    if backend == "triton":
        group_siblings(model)

