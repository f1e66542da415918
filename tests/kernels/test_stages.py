"""The stages of one W4A8 call (kernels/stages.py), on the CPU with stand-in kernels that check the operand
shapes the real ones need: for every token count, `gemm(act(), pack)` hands each GEMM what it takes. (The
benchmark's own copy of this dispatch passed the token-major GEMM the [1, M, K] activation output for
64 < M <= 256 and crashed.)"""

import subprocess
import sys
import types

import pytest
import torch

from pytest_duquant.kernels.packs import SMALL_M
from pytest_duquant.kernels.stages import linear_stages, pick_config


def _ops(calls):
    def two_d(a, m, k):
        assert a.dim() == 2 and tuple(a.shape) == (m, k), f"GEMM got operand {tuple(a.shape)}, needs [{m}, {k}]"

    def act_chunks(x2, perm, r_in, block, *, mode, bm, warps):
        m, k = x2.shape
        calls.append("act_chunks")
        return torch.zeros(1, m, k), torch.zeros(1, m, k // 64)

    def act_small(x2, pack, cfg):
        calls.append("act_small")
        m, k = x2.shape
        return torch.zeros(1, m, k), torch.zeros(1, m, k // 64)

    def act_quant_large(x2, pack, cfg):
        calls.append("act_quant_large")
        return torch.zeros(x2.shape, dtype=torch.int8), torch.zeros(x2.shape[0])

    def w4a8_gemm(a, s, pack, cfg, *, a_float, out_dtype, w_int8=None):
        calls.append("w4a8_gemm")
        two_d(a, a.shape[0], pack.in_features)
        assert s.shape[0] == a.shape[0]
        return torch.zeros(a.shape[0], pack.out_features, dtype=out_dtype)

    def gemm_small(a, s, pack, cfg, *, out_dtype):
        calls.append("gemm_small")
        assert a.dim() in (2, 3) and a.shape[-1] == pack.in_features
        return torch.zeros(a.shape[-2], pack.out_features, dtype=out_dtype)

    return types.SimpleNamespace(act_chunks=act_chunks, act_small=act_small, act_quant_large=act_quant_large,
                                 w4a8_gemm=w4a8_gemm, gemm_small=gemm_small,
                                 unpack_weight_int8=lambda p: torch.zeros(p.out_features, p.in_features))


@pytest.mark.parametrize("m", [1, 16, 50, 64, 65, 100, 128, 200, 256, 257, 800, 4096])
def test_every_token_count_hands_the_gemm_operands_it_takes(m):
    k, n = 1024, 256
    pack = types.SimpleNamespace(in_features=k, out_features=n, perm=None, r_in=None, block=16)
    calls = []
    cfg = pick_config(m, n, k)
    act, gemm = linear_stages(torch.zeros(m, k, dtype=torch.bfloat16), pack, cfg, _ops(calls))
    y = gemm(act(), pack)
    assert tuple(y.shape) == (m, n) and y.dtype == torch.bfloat16
    expected = ("act_small", "gemm_small") if m <= SMALL_M else (
        ("act_chunks", "w4a8_gemm") if m <= 256 else ("act_quant_large", "w4a8_gemm"))
    assert tuple(calls) == expected


def test_gpu_bench_times_the_stages_of_the_model_path():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "scripts" / "gpu_bench.py").read_text()
    assert "linear_stages(x, lay.w4a8, pick, tk)" in text and "tk.act_chunks(" not in text
    assert '"pytest_duquant.plugin"' not in text and "pytest_plugin_args()" in text


def test_child_pytest_loads_the_plugin_once(tmp_path):
    """`-p pytest_duquant.plugin` on top of the installed entry point registers the module twice; the
    arguments gpu_bench now passes load it exactly once, installed or not."""
    from pytest_duquant.testing import pytest_plugin_args

    (tmp_path / "test_one.py").write_text("def test_one(duquant_config):\n    assert duquant_config\n")
    run = subprocess.run([sys.executable, "-m", "pytest", *pytest_plugin_args(), "-q", "-p", "no:cacheprovider",
                          str(tmp_path / "test_one.py")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout


def test_plugin_args_follow_the_entry_point(monkeypatch):
    import importlib.metadata as md

    from pytest_duquant import testing

    ep = md.EntryPoint(name="duquant", value="pytest_duquant.plugin", group="pytest11")
    monkeypatch.setattr(md, "entry_points", lambda group=None: [ep] if group == "pytest11" else [])
    assert testing.pytest_plugin_args() == []
    monkeypatch.setattr(md, "entry_points", lambda group=None: [])
    assert testing.pytest_plugin_args() == ["-p", "pytest_duquant.plugin"]
