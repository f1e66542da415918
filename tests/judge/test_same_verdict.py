"""The CLI and the pytest path give the same verdict on the same inputs: both call judge(); the plugin's
duquant_success_regression fixture is usable from any project's tests."""

from __future__ import annotations

import pytest

from pytest_duquant.cli import main

pytest_plugins = ["pytester"]

CASES = {"pass": (0, 0), "regression": (25, 1), "inconclusive": (4, 3), "incomplete": (0, 2)}


@pytest.fixture
def project(pytester):
    from tests.judge.conftest import Setup

    s = Setup(pytester.path)
    files = {}
    for name, (flip, _) in CASES.items():
        keep = (lambda recs: recs[:60]) if name == "incomplete" else None
        files[name] = s.candidate(f"{name}.jsonl", flip=flip, keep=keep)
    pytester.makepyfile(
        test_project="""
        import pytest
        from pytest_duquant.results import read_results

        @pytest.mark.parametrize("name", ["pass", "regression", "inconclusive", "incomplete"])
        def test_quantized_run(duquant_success_regression, name):
            duquant_success_regression.check(read_results(f"{name}.jsonl"), "libero_spatial", preset="B")
        """
    )
    return s, files


def test_cli_and_pytest_agree(project, pytester, capsys):
    s, files = project
    cli = {name: main(["gate", str(path), str(s.root)]) for name, path in files.items()}
    assert cli == {name: code for name, (_, code) in CASES.items()}
    capsys.readouterr()
    result = pytester.runpytest("-p", "no:cacheprovider", "-rf")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines([
        "*test_quantized_run?regression?*", "*VERDICT: REGRESSION (exit 1)*",
        "*test_quantized_run?inconclusive?*", "*VERDICT: INCONCLUSIVE (exit 3)*",
        "*test_quantized_run?incomplete?*", "*incomplete run: 40 of the 100 planned*", "*VERDICT: UNUSABLE (exit 2)*",
    ])


def test_the_allowed_drop_option_reaches_the_judge(project, pytester):
    s, files = project
    assert main(["gate", str(files["regression"]), str(s.root), "--allowed-drop", "0.4"]) == 0
    result = pytester.runpytest("-p", "no:cacheprovider", "--duquant-allowed-drop=0.4", "-k", "regression")
    result.assert_outcomes(passed=1)
