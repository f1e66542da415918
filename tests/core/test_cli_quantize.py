"""`duquant quantize`, the README's main job, on the embedded default: the shipped reference policy."""

import json

from pytest_duquant.cli import main
from pytest_duquant.policies.reference import reference_checkpoint
from pytest_duquant.policies.session import checkpoint_fingerprint


def test_main_job_prints_plan_table_and_writes_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENPI_DUQUANT_PACKDIR", str(tmp_path / "packs"))
    assert main(["quantize", "--preset", "B", "--out", str(tmp_path / "r"), "--no-rtn"]) == 0
    out = capsys.readouterr().out
    fingerprint = checkpoint_fingerprint(reference_checkpoint())
    assert "preset=B" in out and "the shipped reference policy" in out and f"fingerprint {fingerprint}" in out
    assert "calibration.npz" in out  # calibrated on the checkpoint's own LIBERO frames
    assert "paligemma_with_expert.gemma_expert.model.layers.3.mlp.down_proj" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["preset"] == "B" and len(report["layers"]) == 4 * 7
    assert all(5.0 < la["sqnr_db"] < 60.0 for la in report["layers"])
    assert 0.0 < report["output"]["rel_l2"] < 0.5
    assert report["bytes_after"] < report["bytes_before"]


def test_dry_run_and_fp_change_nothing(tmp_path, capsys):
    assert main(["quantize", "--dry-run", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "would be quantized" in out and not (tmp_path / "r").exists()


def test_bad_preset_and_bad_checkpoint_exit_2(tmp_path, capsys):
    assert main(["quantize", "--preset", "turbo"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    (tmp_path / "ck").mkdir()
    assert main(["quantize", "--ckpt", str(tmp_path / "ck")]) == 2
    assert str(tmp_path / "ck") in capsys.readouterr().err
