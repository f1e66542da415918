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
    assert mod.main([str(SPEED / "gpu_speed.json"), "--throughput", str(SPEED / "libero_throughput.json"),
                     "--throughput", str(SPEED / "libero_throughput_compiled.json")]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "cut before the end" in out
    # batch 1: reference/fast, eager/graphed, short-query; compiled step; compiled step + prefix
    assert "| 1 | 213.6 | 47.3 | 172.1 | 42.6 | 37.6 | 24.4 | 21.8 |" in out
    assert "| 8 | 267.3 | 161.9 | 211.9 | 85.2 | 80.6 | 65.7 | 56.1 |" in out
    assert "| quantized_A | 126 | 20.3 | 42.8 (1.005×) | 101.6 (1.193×) |" in out
    assert "+328" in out and "-452" in out  # allocated memory grows while quantized, falls once deployed
    assert "| 14 | 7 | 28 | 43.3 | 2330 | 83.9 | 5.9 | 22.0 |" in out  # the compiled policy's LIBERO run
    # the targets, judged against the fastest bf16 call (compiled step + prefix)
    assert "| bf16 call, batch 1 (ms, best graphed) | 21.8 | ≤ 20 | not met |" in out
    assert "| bf16 call, batch 8 (ms, best graphed) | 56.1 | ≤ 60 | **met** |" in out
    assert "| quantized_A vs the best bf16 call, batch 1 (×) | 1.95 | ≤ 0.9 | not met |" in out
    assert "| quantized_A: allocated memory saved, deployed (GiB) | 0.421 | ≥ 0.4 | **met** |" in out
    assert "| quantized_B: expert weights resident vs bf16 (×) | 0.293 | ≤ 0.3 | **met** |" in out
    assert "| LIBERO episodes/h (full pi05, 1 GPU + 16 cores; best run) | 2330 | ≥ 4000 | not met |" in out


def test_targets_on_a_run_without_figures_say_not_measured():
    mod = _script()
    lines = mod.targets_table({}, [])
    assert lines[2] == "| bf16 call, batch 1 (ms, best graphed) | not measured | ≤ 20 | — |"
    assert lines[-1].startswith("| LIBERO episodes/h") and "not measured" in lines[-1]
    met = mod.targets_table({"calls": {"b1": {"fast_graph": {"median_ms": 19.9}}}}, [])
    assert met[2] == "| bf16 call, batch 1 (ms, best graphed) | 19.9 | ≤ 20 | **met** |"


def test_unreadable_input_is_a_one_line_error(tmp_path, capsys):
    mod = _script()
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    assert mod.main([str(bad)]) == 2
    assert mod.main([str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("speed_report: cannot read") == 2 and "Traceback" not in err
