"""Quantized checkpoints: `duquant quantize --save DIR` writes one, `--ckpt DIR` loads it (no re-quantizing, no
re-calibrating) and gives the freshly quantized policy's actions bit for bit; bad files get one-line errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from pytest_duquant.cli import main
from pytest_duquant.config import from_env
from pytest_duquant.deploy import PackedDuQuantLinear, resident_bytes
from pytest_duquant.libero.calibration import calibration_observations
from pytest_duquant.libero.policy import PolicyUnavailableError, pi05_policy_factory
from pytest_duquant.policies.pi05 import quantized_checkpoint as qc
from pytest_duquant.policies.pi05.errors import CheckpointError
from pytest_duquant.policies.pi05.policy import load_policy
from pytest_duquant.policies.pi05.processing import synthetic_observations
from pytest_duquant.policies.session import (
    SessionPolicyError,
    checkpoint_fingerprint,
    init_checkpoint,
    policy_factory,
    quantize_and_calibrate,
)

OBS = synthetic_observations(3, seed=11)
SEEDS = [5, 6, 7]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(FP checkpoint, quantized checkpoint, CLI stdout): the dummy pi0.5 quantized under preset B."""
    root = tmp_path_factory.mktemp("qckpt")
    fp = init_checkpoint(root / "fp", "dummy", 0)
    mp = pytest.MonkeyPatch()
    mp.setenv("OPENPI_DUQUANT_PACKDIR", str(root / "packs"))
    mp.setenv("OPENPI_DUQUANT_CALIB_STEPS", "8")  # calibration is what costs here; 8 policy calls do
    try:
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["quantize", "--ckpt", str(fp), "--preset", "B", "--out", str(root / "report"), "--no-rtn",
                         "--save", str(root / "q")])
    finally:
        mp.undo()
    assert code == 0, buf.getvalue()
    return fp, root / "q", buf.getvalue()


def _fresh(fp, tmp_path):
    """The FP checkpoint quantized and calibrated now, as `duquant quantize` does (synthetic calibration)."""
    config = from_env({"OPENPI_DUQUANT_PACKDIR": str(tmp_path / "packs"), "OPENPI_DUQUANT_CALIB_STEPS": "8"},
                      preset="B")
    policy, _ = quantize_and_calibrate(policy_factory(fp)(), config, calibration_observations("synthetic"))
    return policy


def test_saved_checkpoint_loads_and_acts_bit_for_bit_like_the_fresh_quantization(saved, tmp_path):
    fp, q, out = saved
    assert sorted(p.name for p in q.iterdir()) == sorted(
        ["assets", "config.json", "tokenizer.model", qc.MANIFEST_NAME, qc.TENSORS_NAME])
    manifest = json.loads((q / qc.MANIFEST_NAME).read_text())
    assert manifest["format_version"] == qc.FORMAT_VERSION and manifest["preset"] == "B"
    assert manifest["fp_fingerprint"] == checkpoint_fingerprint(fp)
    assert manifest["duquant"]["block"] == 64 and len(manifest["layers"]) == 4 * 7
    loaded = load_policy(q)
    layers = [m for m in loaded.model.modules() if isinstance(m, PackedDuQuantLinear)]
    assert len(layers) == 28 and all(m.act_scale is not None for m in layers)
    fresh = _fresh(fp, tmp_path)
    calls = [m.observer.calls for m in layers]
    a = loaded.infer_batch(OBS, SEEDS)
    assert [m.observer.calls for m in layers] == calls  # nothing observed: no re-calibration
    b = fresh.infer_batch(OBS, SEEDS)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, policy_factory(fp)().infer_batch(OBS, SEEDS))  # and it is quantized
    assert loaded.fingerprint == checkpoint_fingerprint(fp) and loaded.preset == "B"


def test_quantize_reports_resident_bytes_before_and_after(saved):
    _, q, out = saved
    line = next(la for la in out.splitlines() if la.startswith("resident"))
    assert "FP" in line and "deployed" in line and "packed weight codes" in out
    assert f"quantized checkpoint: {q}" in out


def test_every_entry_point_accepts_the_quantized_checkpoint(saved, capsys):
    fp, q, _ = saved
    make = policy_factory(q)
    assert make.fingerprint == checkpoint_fingerprint(fp)  # judged against the FP checkpoint's goldens
    policy, report = quantize_and_calibrate(make(), from_env({"OPENPI_DUQUANT_CALIB_STEPS": "8"}, preset="B"))
    assert report.layers == [] and policy.preset == "B"
    with pytest.raises(SessionPolicyError, match=r"preset B; this run asks for act_pct=99.9 \(stored 98.0\)"):
        quantize_and_calibrate(make(), from_env({}, preset="A"))
    factory = pi05_policy_factory(q, None, device="cpu")  # duquant rollouts without --preset
    assert factory.preset == "B" and factory.fingerprint == make.fingerprint
    with pytest.raises(PolicyUnavailableError, match="quantized with preset B"):
        pi05_policy_factory(q, from_env({}, preset="A"), device="cpu")
    assert main(["quantize", "--ckpt", str(q)]) == 0
    out = capsys.readouterr().out
    assert "loaded as saved" in out and "preset B, 28 quantized layers" in out
    held = resident_bytes(make().model)
    assert "float weight copy" not in held.by_kind and "int8 weight codes" not in held.by_kind
    assert held.by_kind["packed weight codes"] == sum(  # 4 bits per weight of the 28 expert linears
        m.w_packed.numel() for m in make().model.modules() if isinstance(m, PackedDuQuantLinear))


def test_the_report_json_has_resident_bytes_and_the_deployed_form_is_smaller(saved):
    report = json.loads((saved[1].parent / "report" / "report.json").read_text())["resident"]
    # The dummy's expert is 64 wide: its BLOCK=64 rotations are as large as its weights, so the whole deployed
    # dummy is about the FP size; what deploying removes (the float copy and the int8 codes) is real.
    undeployed = report["quantized_undeployed"]["by_kind"]
    assert undeployed["float weight copy"] == 4 * undeployed["int8 weight codes"] > 0
    assert report["quantized_undeployed"]["total"] - report["after"]["total"] >= undeployed["float weight copy"]


def _copy(q, tmp_path):
    dst = tmp_path / "q"
    shutil.copytree(q, dst)
    return dst


def _edit_manifest(d, **changes):
    path = d / qc.MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _rewrite_tensors(d, drop=None, metadata=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = d / qc.TENSORS_NAME
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        meta = {**f.metadata(), **(metadata or {})}
    save_file(tensors, str(path), metadata=meta)
    _edit_manifest(d, tensors={"file": qc.TENSORS_NAME, "sha256": qc._sha256(path), "bytes": path.stat().st_size})


def _break(kind, d):
    if kind == "version":
        _edit_manifest(d, format_version=99)
    elif kind == "not json":
        (d / qc.MANIFEST_NAME).write_text("{")
    elif kind == "missing tensor":
        _rewrite_tensors(d, drop="paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.w_packed")
    elif kind == "other fp checkpoint":
        _rewrite_tensors(d, metadata={"fp_fingerprint": "0123456789abcdef"})
    elif kind == "truncated":
        path = d / qc.TENSORS_NAME
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "bit flip":
        path = d / qc.TENSORS_NAME
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind,message", [
    ("version", "format version 99; this pytest-duquant reads version 1"),
    ("not json", "not valid JSON"),
    ("missing tensor", "1 missing tensor(s): paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.w_packed"),
    ("other fp checkpoint", "quantized from FP checkpoint 0123456789abcdef, but"),
    ("truncated", "(truncated or replaced)"),
    ("bit flip", "sha256 differs"),
])
def test_bad_files_get_one_line_errors_and_exit_2(saved, tmp_path, capsys, kind, message):
    d = _copy(saved[1], tmp_path)
    _break(kind, d)
    with pytest.raises(CheckpointError) as err:
        load_policy(d)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert main(["quantize", "--ckpt", str(d)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err and len(captured.err.splitlines()) == 1


def test_a_checkpoint_of_another_fp_checkpoint_is_refused_when_one_is_expected(saved):
    with pytest.raises(CheckpointError, match="not from 0123456789abcdef"):
        qc.load_quantized(saved[1], expected_fp_fingerprint="0123456789abcdef")


def test_saving_refuses_uncalibrated_and_fp_folders(saved, tmp_path):
    fp = saved[0]
    policy = policy_factory(fp)()
    from pytest_duquant.quantize import quantize_model

    config = from_env({"OPENPI_DUQUANT_PACKDIR": str(tmp_path / "packs")}, preset="B")
    quantize_model(policy.model, config)
    with pytest.raises(CheckpointError, match="no calibrated activation scale"):
        qc.save_quantized(policy, tmp_path / "out", config=config, fp_ckpt=fp, fp_fingerprint="x")
    with pytest.raises(CheckpointError, match="holds an FP checkpoint"):
        qc.save_quantized(policy, fp, config=config, fp_ckpt=fp, fp_fingerprint="x")
    assert torch.is_tensor(policy.model.paligemma_with_expert.gemma_expert.model.layers[0].mlp.up_proj.w_packed)
