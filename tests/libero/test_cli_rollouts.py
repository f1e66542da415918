"""`duquant rollouts`: argument errors exit 2 with a message naming the bad value (no simulator run)."""

from __future__ import annotations

import pytest

from pytest_duquant.cli import main


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--suite", "libero_spatal"], "suite='libero_spatal': unknown LIBERO suite"),
        (["--tasks", "3-12"], "--tasks='3-12': id 10 out of range 0..9"),
        (["--trials", "60"], "--trials 60: must be 1..50"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    code = main(["rollouts", "--ckpt", str(tmp_path), "--out", str(tmp_path / "r.jsonl"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_directory_without_a_checkpoint_exits_2(tmp_path, capsys):
    pytest.importorskip("libero", reason="hf-libero not installed")
    code = main(
        [
            "rollouts",
            "--ckpt",
            str(tmp_path),
            "--out",
            str(tmp_path / "r.jsonl"),
            "--tasks",
            "0",
            "--trials",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2 and f"--ckpt {tmp_path}: cannot load the pi0.5 policy" in err and "model.safetensors" in err
    )
