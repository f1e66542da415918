"""scripts/speed_report.py renders docs/speed.md's H200 tables from the committed JSON (docs/results/speed/)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEED = ROOT / "docs" / "results" / "speed"


def _script():
    spec = importlib.util.spec_from_file_location("speed_report", ROOT / "scripts" / "speed_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tables_carry_the_committed_h200_figures(capsys):
    mod = _script()
    assert mod.main([str(SPEED / "gpu_speed.json"), "--throughput", str(SPEED / "libero_throughput.json")]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "cut before the end" in out
    assert "| 1 | 260.5 | 48.9 | 228.4 | 44.8 | — |" in out  # batch 1: reference/fast, eager/graphed
    assert "| 8 | 324.8 | 163.0 | 222.9 | 88.2 | — |" in out
    assert "| quantized_A | 126 | 17.53 | 45.2 (1.008×) | 104.5 (1.184×) |" in out
    assert "+328" in out and "+2389" in out  # allocated memory grew (today's layers, not deployed)
    assert "| 1 | — | 2 | 27.7 | 260 | 43.7 | 1.0 | 19.8 |" in out and "did not finish" in out


def test_unreadable_input_is_a_one_line_error(tmp_path, capsys):
    mod = _script()
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert mod.main([str(bad)]) == 2
    assert mod.main([str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("speed_report: cannot read") == 2 and "Traceback" not in err
