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


@pytest.mark.parametrize(
    "argv,env,enabled,preset",
    [
        ([], {}, False, "fp"),  # nothing asks for quantization: an FP run, labelled fp
        (["--preset", "B"], {}, True, "B"),
        ([], {"OPENPI_DUQUANT_BLOCK": "64"}, True, "A"),  # a variable asks for it (defaults = preset A)
    ],
)
def test_the_run_is_fp_unless_a_preset_or_a_variable_asks_for_quantization(
    tmp_path, capsys, monkeypatch, argv, env, enabled, preset
):
    from pytest_duquant.libero import policy as policy_mod
    from pytest_duquant.libero import sim_setup

    for k in [k for k in __import__("os").environ if k.startswith("OPENPI_DUQUANT_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sim_setup, "check_suite_assets", lambda suite: None)
    monkeypatch.setattr(sim_setup, "libero_package_root", lambda: tmp_path)
    seen = {}

    def factory(ckpt, config=None, **kw):
        seen["config"], seen["fast"] = config, kw.get("fast")
        raise policy_mod.PolicyUnavailableError("stop here")

    monkeypatch.setattr(policy_mod, "pi05_policy_factory", factory)
    code = main(["rollouts", "--ckpt", str(tmp_path), "--out", str(tmp_path / "r.jsonl"), *argv])
    assert code == 2 and "stop here" in capsys.readouterr().err
    assert seen["config"].enabled is enabled and seen["config"].preset == preset
    assert seen["fast"] is True  # the fast path is the default
    code = main(["rollouts", "--ckpt", str(tmp_path), "--out", str(tmp_path / "r.jsonl"), "--exact-path", *argv])
    assert code == 2 and seen["fast"] is False


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--serve", "fastest"], "--serve 'fastest': unknown; allowed: graphed, compiled"),
        (["--serve", "compiled", "--device", "cpu"], "--serve 'compiled' compiles for a CUDA GPU; this policy runs "
                                                     "on 'cpu'"),
        (["--serve", "compiled", "--exact-path"], "--serve 'compiled' serves the fast path; --exact-path"),
    ],
)
def test_bad_serving_exits_2_before_any_checkpoint_is_read(tmp_path, capsys, argv, message):
    pytest.importorskip("libero", reason="hf-libero not installed")
    code = main(["rollouts", "--ckpt", str(tmp_path / "no-such-ckpt"), "--suite", "libero_object",
                 "--out", str(tmp_path / "r.jsonl"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "no-such-ckpt" not in err and "Traceback" not in err
