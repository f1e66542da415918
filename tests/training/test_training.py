"""Training the reference policy: data processing, tokenizer, the flow-matching forward, a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pytest_duquant.policies.pi05.configuration import variant_config
from pytest_duquant.policies.pi05.tokenizer import PaligemmaTokenizer
from pytest_duquant.training import data, flow
from pytest_duquant.training.tokenizer import train_prompt_tokenizer

PROMPTS = ["pick up the milk and place it in the basket", "pick up the ketchup and place it in the basket"]


def test_action_chunks_hold_the_next_labels_and_repeat_the_last():
    a = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
    c = data.action_chunks(a, 3)
    assert c.shape == (4, 3, 2)
    np.testing.assert_array_equal(c[0], a[0:3])
    np.testing.assert_array_equal(c[2], a[[2, 3, 3]])
    np.testing.assert_array_equal(c[3], a[[3, 3, 3]])


def test_quantile_normalization_maps_q01_q99_to_minus_one_plus_one_and_pads():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(1000, 7)).astype(np.float32)
    stats = data.quantile_norm_stats(rng.normal(size=(1000, 8)), acts)
    chunk = np.stack([stats.actions.q01, stats.actions.q99])[None].astype(np.float32)  # [1, 2, 7]
    out = data.normalize_actions(chunk, stats, action_dim=32)
    assert out.shape == (1, 2, 32)
    np.testing.assert_allclose(out[0, 0, :7], -1.0, atol=1e-5)
    np.testing.assert_allclose(out[0, 1, :7], 1.0, atol=1e-5)
    assert np.all(out[..., 7:] == 0)
    # and the policy's unnormalization inverts it (openpi's +1e-6 convention on both sides)
    from pytest_duquant.policies.pi05.processing import unnormalize_actions

    np.testing.assert_allclose(unnormalize_actions(out[0, :, :7], stats), chunk[0], atol=1e-5)


def test_prompt_tokenizer_is_small_deterministic_and_fits_the_reference_variant():
    cfg = variant_config("reference")
    proto = train_prompt_tokenizer(PROMPTS)
    assert proto == train_prompt_tokenizer(PROMPTS)
    tok = PaligemmaTokenizer(None, cfg.max_token_len, model_proto=proto)
    assert tok.vocab_size <= cfg.vocab_size
    ids = tok.prompt_ids(PROMPTS[0], np.linspace(-1, 1, 8))
    assert ids[0] == 2 and len(ids) <= cfg.max_token_len  # BOS; a prompt with its state fits
    assert len(ids) < 40  # whole words, not letters
    text = tok._sp.decode(ids)
    assert "milk" in text and "State:" in text and "Action:" in text
    with pytest.raises(ValueError, match="no prompts"):
        train_prompt_tokenizer([])


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.rand(b, 2, 3, 224, 224, generator=g) * 2 - 1,
        "image_masks": torch.ones(b, 2, dtype=torch.bool),
        "tokens": torch.randint(4, 300, (b, cfg.max_token_len), generator=g),
        "token_masks": torch.arange(cfg.max_token_len)[None].expand(b, -1) < 20,
        "actions": torch.randn(b, cfg.action_horizon, cfg.action_dim, generator=g),
    }


def test_training_velocity_is_the_models_joint_velocity_and_trains_the_expert():
    from pytest_duquant.policies.pi05.modeling import random_model

    cfg = variant_config("reference")
    model = random_model(cfg, seed=0)
    b = _batch(cfg)
    x_t, t = torch.randn(2, cfg.action_horizon, cfg.action_dim), torch.tensor([0.3, 0.9])
    args = (b["images"], b["image_masks"], b["tokens"], b["token_masks"], x_t, t)
    v_train = flow.velocity(model, *args)
    v_infer, _ = model.joint_velocity(*args)
    torch.testing.assert_close(v_train, v_infer)  # the training forward is the inference path's joint pass
    loss = flow.flow_matching_loss(model, b, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    expert_q = model.paligemma_with_expert.gemma_expert.model.layers[0].self_attn.q_proj.weight
    assert expert_q.grad is not None and expert_q.grad.abs().sum() > 0
    ts = flow.sample_time(10_000, torch.Generator().manual_seed(1), "cpu")
    assert 0.001 <= ts.min() and ts.max() <= 1.0
    assert abs(ts.mean().item() - (0.6 * 0.999 + 0.001)) < 0.01  # Beta(1.5, 1) has mean 0.6


def _write_demos(tmp_path):
    """Two synthetic 6-frame demonstrations (init states 0 and 1) in `duquant demos`' format."""
    from pytest_duquant.libero.demos import FORMAT, MANIFEST

    demo_dir = tmp_path / "demos"
    (demo_dir / "libero_object").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for e, prompt in enumerate(PROMPTS):
        t = 6
        rel = f"libero_object/task{e:02d}_trial00_r0.npz"
        meta = {"suite": "libero_object", "task_id": e, "trial": e, "repeat": 0, "seed": 7, "success": True,
                "frames": t, "file": rel, "expert_version": "test", "format": FORMAT}
        np.savez(demo_dir / rel, image=rng.integers(0, 255, (t, 224, 224, 3), dtype=np.uint8),
                 wrist_image=rng.integers(0, 255, (t, 224, 224, 3), dtype=np.uint8),
                 state=rng.normal(size=(t, 8)).astype(np.float32),
                 actions=rng.uniform(-1, 1, (t, 7)).astype(np.float32),
                 executed=np.zeros((t, 7), np.float32), step=np.arange(10, 10 + t, dtype=np.int32),
                 prompt=np.array(prompt), meta=np.array(json.dumps(meta)))
        lines.append(json.dumps(meta))
    (demo_dir / MANIFEST).write_text("\n".join(lines) + "\n")
    return demo_dir


@pytest.mark.slow
def test_train_writes_a_checkpoint_that_loads_and_acts(tmp_path):
    """Two training steps on CPU over two synthetic demonstrations; the checkpoint loads with --ckpt."""
    from pytest_duquant.policies.pi05.policy import load_policy
    from pytest_duquant.training.train import TrainSettings, train

    demo_dir = _write_demos(tmp_path)
    out = tmp_path / "ckpt"
    log = train(TrainSettings(demos=str(demo_dir), out=str(out), steps=2, batch=2, device="cpu", warmup=1,
                              log_every=1, save_every=0, holdout_trials=(1,)), progress=False)
    assert log["steps_done"] == 2 and log["data"]["episodes"] == 1  # init state 1 held out
    assert log["data"]["frames"] == 6 and np.isfinite(log["final_loss"])
    for name in ("model.safetensors", "config.json", "tokenizer.model", "calibration.npz", "train_log.json"):
        assert (out / name).is_file(), name
    assert not (out / "train_state.pt").exists()  # finished: no resume state left behind
    policy = load_policy(out)
    assert policy.config.variant == "reference"
    with np.load(out / "calibration.npz") as z:
        obs = {"observation/image": z["image"][0], "observation/wrist_image": z["wrist_image"][0],
               "observation/state": z["state"][0], "prompt": str(z["prompt"][0])}
    actions = policy.infer(obs, noise_seed=3)
    assert actions.shape == (10, 7) and np.all(np.isfinite(actions))


@pytest.mark.slow
def test_a_stopped_run_resumes_where_it_stopped_and_two_processes_train_as_one(tmp_path):
    """--stop-after-minutes ends a run resumably (interim checkpoint + state); the rerun continues from its
    step and time; `--gpus 2 --device cpu` trains in two processes (gloo) and rank 0 alone writes."""
    import subprocess
    import sys

    from pytest_duquant.training.train import TrainSettings, train

    demo_dir = _write_demos(tmp_path)
    out = tmp_path / "ckpt"
    common = dict(demos=str(demo_dir), out=str(out), steps=3, batch=2, device="cpu", warmup=1, log_every=1,
                  save_every=0, max_minutes=60)
    log = train(TrainSettings(**common, stop_after_minutes=0.0), progress=False)
    assert log["stopped"] == "run limit" and log["steps_done"] == 0
    assert (out / "train_state.pt").is_file() and (out / "model.safetensors").is_file()
    log = train(TrainSettings(**common), progress=False)
    assert log["stopped"] == "steps" and log["steps_done"] == 3 and len(log["history"]) == 3
    assert not (out / "train_state.pt").exists()

    out2 = tmp_path / "ckpt2"
    r = subprocess.run([sys.executable, "-m", "pytest_duquant", "train", "--demos", str(demo_dir), "--out",
                        str(out2), "--steps", "2", "--batch", "1", "--device", "cpu", "--gpus", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    log2 = json.loads((out2 / "train_log.json").read_text())
    assert log2["processes"] == 2 and log2["steps_done"] == 2
    assert log2["history"][-1]["samples_per_s"] > 0
