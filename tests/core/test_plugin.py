"""The pytest plugin, tested through pytester (it is registered by the pytest11 entry point)."""

import json

import pytest

pytest_plugins = ["pytester"]


def test_summary_shows_env_over_preset(pytester, monkeypatch):
    monkeypatch.setenv("OPENPI_DUQUANT_BLOCK", "64")
    monkeypatch.setenv("OPENPI_DUQUANT_PERMUTE", "0")
    pytester.makepyfile("def test_ok(duquant_config):\n    assert duquant_config.block == 64\n")
    result = pytester.runpytest("--duquant-preset=A")
    result.assert_outcomes(passed=1)
    result.stdout.re_match_lines([
        r".*DuQuant configuration in force.*",
        r"preset A; precedence.*",
        r"\s+BLOCK\s+= 64\s+\[environment\]",
        r"\s+PERMUTE\s+= 0\s+\[environment\]",
        r"\s+ROW_ROT\s+= restore\s+\[preset A\]",
    ], consecutive=False)
    result.stdout.fnmatch_lines(["*WBITS_DEFAULT*= 4*[[]preset A[]]*", "*CALIB_STEPS*= 32*[[]preset A[]]*"])


def test_preset_option_reaches_the_fixture_and_ini_works(pytester):
    pytester.makeini("[pytest]\nduquant_preset = speed\n")
    pytester.makepyfile(
        "def test_cfg(duquant_config):\n"
        "    assert (duquant_config.preset, duquant_config.block, duquant_config.row_rot) == ('speed', 128, '0')\n"
    )
    pytester.runpytest().assert_outcomes(passed=1)
    pytester.makepyfile(
        "def test_cfg(duquant_config):\n    assert duquant_config.preset == 'B' and duquant_config.block == 64\n"
    )
    pytester.runpytest("--duquant-preset=b").assert_outcomes(passed=1)


def test_bad_preset_or_variable_is_a_usage_error_not_a_traceback(pytester, monkeypatch):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--duquant-preset=turbo")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*DuQuant configuration: --duquant-preset=turbo: unknown preset*"])
    monkeypatch.setenv("OPENPI_DUQUANT_BLOCK", "48")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*OPENPI_DUQUANT_BLOCK=48: must be a positive integer, a power of two*"])
    assert "Traceback" not in result.stderr.str()


def test_missing_ckpt_dir_is_a_usage_error(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest("--ckpt", "/nonexistent/ckpt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ckpt /nonexistent/ckpt: no such checkpoint directory*"])


def test_quantize_factory_uses_session_config_with_overrides_and_a_temp_packdir(pytester):
    pytester.makepyfile(
        """
        import os
        from torch import nn
        from pytest_duquant.layer import DuQuantLinear

        def test_factory(quantize, duquant_config):
            m = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
            report = quantize(m, scope="", include=".*", block=8)
            assert isinstance(m[0], DuQuantLinear) and m[0].block == 8 and m[0].wbits == 4
            assert len(report.layers) == 2
            assert not os.path.exists("duquant_packed")
            assert os.path.isdir(duquant_config.packdir)
        """
    )
    pytester.runpytest("--duquant-preset=A").assert_outcomes(passed=1)


def test_markers_are_registered_and_gpu_tests_skip_with_the_reason(pytester, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, also when run on a GPU box
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu
        def test_gpu():
            assert False

        @pytest.mark.libero
        def test_rollouts():
            assert False

        @pytest.mark.slow
        def test_slow():
            pass
        """
    )
    result = pytester.runpytest("--strict-markers", "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*needs a CUDA GPU*", "*run only when selected: -m libero [--ckpt DIR]*"])


def test_fp_preset_summary_says_no_quantization(pytester):
    pytester.makepyfile("def test_cfg(duquant_config):\n    assert not duquant_config.enabled\n")
    result = pytester.runpytest("--duquant-preset=fp")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*preset fp: no quantization*"])


def test_duquant_report_option_writes_png_and_json_at_session_end(pytester, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENPI_DUQUANT_CALIB_STEPS", "2")  # keep the end-of-run measurement short
    pytester.makepyfile("def test_x():\n    pass\n")
    out = tmp_path / "report"
    result = pytester.runpytest("--duquant-preset=B", f"--duquant-report={out}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"report png: {out / 'model.png'}", f"report json: {out / 'model.json'}"])
    assert (out / "model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "model.json").read_text())
    # the session policy is reported (plus whatever the model suite measured earlier in this process)
    assert "pi05:dummy" in data["models"]
