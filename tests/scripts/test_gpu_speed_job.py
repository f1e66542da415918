"""scripts/gpu_speed_job.py (issue 14, docs/speed.md) in its tiny CPU mode: it writes valid JSON with every stage's
figures, marks the GPU-only measurements skipped, and a failing stage is recorded while the next ones still run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentencepiece")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_speed_job.py"


def test_tiny_cpu_run_writes_the_measurements(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--variant", "dummy", "--quick", "--batches", "1,2",
         "--presets", "B,no-such-preset", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["finished"] is True and data["meta"]["variant"] == "dummy" and data["meta"]["device"] == "cpu"
    # the broken preset is recorded as an error; the stages after it still ran
    assert set(data["errors"]) == {"quantized_no-such-preset"}, data["errors"]
    assert "no-such-preset" in data["errors"]["quantized_no-such-preset"]
    st = data["stages"]
    assert list(st) == ["build", "calls", "quantized_B", "compiled", "gpu_tests", "profile", "components",
                        "policy_calls", "quantized_lm_B", "sdpa_backends"]  # the default order: most wanted first
    assert st["gpu_tests"] == st["compiled"] == {"skipped": "skipped: needs CUDA"}
    assert st["build"]["parameters"] > 1e6 and st["sdpa_backends"] == {"skipped": "skipped: needs CUDA"}
    for path in ("reference", "fast"):
        prof = st["profile"][path]
        assert prof["total_ms"] > 0 and {"lm.attention", "expert.mlp", "vision.layers"} <= set(prof["by_role_ms"])
    for b in ("b1", "b2"):
        row = st["calls"][b]
        assert row["reference_eager"]["median_ms"] > 0 and row["fast_eager"]["median_ms"] > 0
        assert row["fast_graph"] == row["reference_graph"] == row["fast_short_query_graph"] == "skipped: needs CUDA"
        # short-query attention in the steps: the same actions (float32 dummy: float rounding)
        assert 0 <= row["max_abs_diff_fast_short_query_eager_vs_reference_eager"] < 1e-4
        # the fast path's actions are the reference's (float32 dummy: float rounding)
        assert 0 <= row["max_abs_diff_fast_eager_vs_reference_eager"] < 1e-4 < row["max_abs_action"]
        q = st["quantized_B"][b]
        assert q["eager"]["median_ms"] > 0 and q["ratio_to_fast_bf16_eager"] > 0
    qb = st["quantized_B"]
    assert qb["layers"] == 28 and qb["report_bytes_after"] < qb["report_bytes_before"]
    assert "memory_allocated_policy_quantized_bytes" not in qb  # CUDA only
    # deployed (packed codes, no float/int8 weight copy): less than the quantized model and than the FP one
    assert qb["deployed_layers"] == 28
    assert qb["tensor_bytes_deployed"] < qb["tensor_bytes_fp"] < qb["tensor_bytes_quantized"]
    assert qb["resident_bytes_deployed"]["total"] == qb["tensor_bytes_deployed"]
    lm = st["quantized_lm_B"]  # language model + expert: 4 + 4 dummy layers x 7 linears
    assert lm["layers"] == 56 and lm["config"]["scope"] == "paligemma_with_expert."
    for label in ("reference_eager", "fast_served"):
        assert st["policy_calls"][label]["b2"]["calls_per_s"] > 0
    assert st["policy_calls"]["fast_served"]["mode"] == "eager"  # a CPU serves eagerly


def test_compile_fusion_variants_are_parsed_and_validated(capsys):
    """--compile-fusion names the compiled stage's launch-saving variants (table COMPILE_FUSION); a typo is
    refused before any stage runs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_speed_job", SCRIPT)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.parse_args([]).compile_fusion == "none" and job.COMPILE_FUSION["none"] == (False, False)
    args = job.parse_args(["--compile-fusion", "none,fused,kvbuf,fused_kvbuf"])
    assert [job.COMPILE_FUSION[f] for f in args.compile_fusion.split(",")] == [
        (False, False), (True, False), (False, True), (True, True)]
    with pytest.raises(SystemExit):
        job.parse_args(["--compile-fusion", "none,fussed"])
    assert "unknown fussed" in capsys.readouterr().err


def test_the_gpu_tests_stage_names_the_failed_tests():
    """pytest's short summary (-rfE) read back: the ids of failed and erroring tests, nothing else."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_speed_job", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = ("....F.\n=== short test summary info ===\nSKIPPED [1] tests/x.py:3: needs CUDA\n"
           "FAILED tests/k.py::test_a[A] - AssertionError: assert 0.2 <= 0.01\n"
           "ERROR tests/k.py::test_b - RuntimeError: boom\nFAILED tests/k.py::test_c\n2 failed, 4 passed\n")
    assert mod.failed_tests(out) == ["tests/k.py::test_a[A]", "tests/k.py::test_b", "tests/k.py::test_c"]
    assert mod.failed_tests("5 passed in 1.0s\n") == []
