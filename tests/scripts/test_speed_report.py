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
    """README's command on the third run (the figures of record): the fused projections + K/V buffer column,
    the compiled W4A8 call, LIBERO with 24 workers, and the targets judged against the run's fastest bf16 call."""
    mod = _script()
    readme = (ROOT / "README.md").read_text()
    args = ["docs/results/speed/gpu_speed.json", "--throughput", "docs/results/speed/libero_throughput.json"]
    assert "python scripts/speed_report.py " + " ".join(args) in readme  # README's command, run here
    assert mod.main([str(ROOT / a) if a.startswith("docs/") else a for a in args]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H200" in out and "finished" in out
    # batch 1: reference/fast, eager/graphed, short-query; compiled step + prefix, then with fused_kvbuf
    assert "| 1 | 371.3 | 47.7 | 173.5 | 42.7 | 37.8 | 21.8 | 19.8 |" in out
    assert "| 8 | 284.8 | 161.7 | 172.6 | 85.3 | 80.4 | 57.0 | 53.4 |" in out
    assert "| quantized_B | 126 | 14.15 | 42.0 (0.984×) | 98.3 (1.152×) | 28.9 (1.461×) | +338 | -440 |" in out
    assert "| 24 | 8 | 150 | 130.7 | 4132 | 4963 | 73.1 | 7.3 | 23.9 |" in out  # with the steady rate
    assert "| bf16 call, batch 1 (ms, best graphed) | 19.8 | ≤ 20 | **met** |" in out
    assert "| bf16 call, batch 8 (ms, best graphed) | 53.4 | ≤ 60 | **met** |" in out
    assert "| quantized_B vs the best bf16 call, batch 1 (×) | 1.46 | ≤ 0.9 | not met |" in out
    assert "| quantized_B: allocated memory saved, deployed (GiB) | 0.410 | ≥ 0.4 | **met** |" in out
    assert "| quantized_B: expert weights resident vs bf16 (×) | 0.293 | ≤ 0.3 | **met** |" in out
    assert "| LIBERO episodes/h (full pi05, 1 GPU + 16 cores; best run) | 4132 | ≥ 4000 | **met** |" in out


def test_the_language_model_run_is_judged_against_its_own_calls(capsys):
    """LM + expert W4A8 ran in its own call: its ratio is to that run's fastest bf16 call (no compiled stage)."""
    mod = _script()
    assert mod.main([str(SPEED / "gpu_speed_lm.json")]) == 0
    out = capsys.readouterr().out
    assert "| quantized_lm_B vs the best bf16 call, batch 1 (×) | 1.18 | ≤ 0.75 | not met |" in out
    assert "| quantized_lm_B: allocated memory saved, deployed (GiB) | 3.114 | ≥ 0.4 | **met** |" in out


def test_the_second_run_is_kept_readable(capsys):
    mod = _script()
    assert mod.main([str(SPEED / "gpu_speed_second.json"), "--throughput",
                     str(SPEED / "libero_throughput_compiled_second.json")]) == 0
    out = capsys.readouterr().out
    assert "cut before the end" in out and "| 1 | 213.6 | 47.3 | 172.1 | 42.6 | 37.6 | 24.4 | 21.8 |" in out
    assert "| 14 | 7 | 28 | 43.3 | 2330 | — | 83.9 | 5.9 | 22.0 |" in out  # no steady rate recorded then
    assert "| quantized_A vs the best bf16 call, batch 1 (×) | 1.95 | ≤ 0.9 | not met |" in out


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
