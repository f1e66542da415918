"""Built-in pi0.5 policy: checkpoints (openpi + lerobot layouts), errors, seeds, batching, attention masks."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("sentencepiece")

from safetensors.torch import load_file, save_file  # noqa: E402

from pytest_duquant.commands import init_checkpoint as init_cmd  # noqa: E402
from pytest_duquant.commands import list_linears as list_cmd  # noqa: E402
from pytest_duquant.policies import CheckpointError, build_policy, load_policy, synthetic_observations  # noqa: E402
from pytest_duquant.policies.pi05.checkpoint import detect_layout, save_checkpoint  # noqa: E402
from pytest_duquant.policies.pi05.modeling import build_model, euler_times  # noqa: E402

SEED = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A dummy checkpoint written by the CLI (openpi layout), as CI's --ckpt."""
    out = tmp_path_factory.mktemp("dummy_ckpt")
    parser = argparse.ArgumentParser()
    init_cmd.register(parser.add_subparsers())
    args = parser.parse_args(
        ["init-checkpoint", str(out), "--variant", "dummy", "--seed", str(SEED), "--force"]
    )
    assert args.func(args) == 0
    return out


@pytest.fixture(scope="module")
def policy(ckpt):
    return load_policy(ckpt)


@pytest.fixture(scope="module")
def obs():
    return synthetic_observations(3, seed=11)


def _copy(ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


# ---------------------------------------------------------------- round trip, seeds, batching
def test_checkpoint_is_openpi_layout(ckpt):
    assert detect_layout(ckpt) == "openpi"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert (cfg["paligemma_variant"], cfg["action_expert_variant"], cfg["action_horizon"]) == (
        "dummy",
        "dummy",
        10,
    )
    stats = json.loads((ckpt / "assets/physical-intelligence/libero/norm_stats.json").read_text())[
        "norm_stats"
    ]
    assert len(stats["actions"]["q01"]) == 7 and len(stats["state"]["q99"]) == 8
    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert "paligemma_with_expert.gemma_expert.model.layers.3.self_attn.q_proj.weight" in keys
    assert "paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight" in keys
    assert "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight" in keys
    assert {
        "action_in_proj.weight",
        "time_mlp_in.bias",
        "time_mlp_out.weight",
        "action_out_proj.bias",
    } <= keys


def test_loaded_policy_matches_the_in_memory_random_policy(ckpt, policy, obs):
    fresh = build_policy("dummy", seed=SEED, tokenizer=ckpt / "tokenizer.model")
    for (name, a), (_, b) in zip(
        fresh.model.state_dict().items(), policy.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(fresh.infer(obs[0], 5), policy.infer(obs[0], 5))


def test_save_load_gives_identical_actions(policy, obs, tmp_path):
    before = policy.infer(obs[1], 42)
    save_checkpoint(policy.model, policy.norm_stats, tmp_path / "again", tokenizer_path=policy.tokenizer.path)
    after = load_policy(tmp_path / "again").infer(obs[1], 42)
    assert before.shape == (10, 7) and before.dtype == np.float32
    np.testing.assert_array_equal(before, after)


def test_same_seed_same_actions_different_seed_different(policy, obs):
    a = policy.infer(obs[0], 0)
    np.testing.assert_array_equal(a, policy.infer(obs[0], 0))
    assert np.abs(a - policy.infer(obs[0], 1)).max() > 1e-2


def test_batched_infer_equals_per_observation(policy, obs):
    seeds = [7, 7, 9]
    batch = policy.infer_batch(obs, seeds)
    assert batch.shape == (3, 10, 7)
    for i in (0, 2):
        np.testing.assert_allclose(batch[i], policy.infer(obs[i], seeds[i]), atol=1e-5, rtol=0)
    # observations really matter: two observations with one seed give different actions
    assert np.abs(batch[0] - batch[1]).max() > 1e-3


def test_euler_schedule_is_openpis():
    times = euler_times(10)
    assert len(times) == 10 and times[0] == 1.0
    np.testing.assert_allclose(times, np.linspace(1.0, 0.1, 10), atol=1e-6)


# ---------------------------------------------------------------- attention masks
def _inputs(policy, obs, seed=0):
    inp = policy.prepare(obs[:1])
    return inp, policy.noise([seed])


def test_cached_denoise_step_equals_joint_pass(policy, obs):
    """The KV-cached path (prefix once, then action tokens) equals openpi's joint prefix+suffix mask."""
    m = policy.model
    inp, x = _inputs(policy, obs)
    t = torch.tensor([0.7])
    with torch.no_grad():
        emb, pad = m.embed_prefix(**inp)
        kv, _ = m.compute_prefix_cache(emb, pad)
        v_cached = m.denoise_step(kv, pad, x, t)
        v_joint, _ = m.joint_velocity(x_t=x, time=t, **inp)
    torch.testing.assert_close(v_cached, v_joint, atol=1e-5, rtol=1e-5)


def test_prefix_does_not_see_action_tokens_but_actions_see_each_other(policy, obs):
    m = policy.model
    inp, x = _inputs(policy, obs)
    t = torch.tensor([0.5])
    x2 = x.clone()
    x2[:, 0] += 3.0  # perturb the first action token only
    v1, prefix1 = m.joint_velocity(x_t=x, time=t, **inp)
    v2, prefix2 = m.joint_velocity(x_t=x2, time=t, **inp)
    _, pad = m.embed_prefix(**inp)
    # valid prefix outputs (hence the K/V the actions read) ignore the actions; padded query rows see no valid
    # key and are garbage in openpi too (uniform softmax), but nothing ever reads them
    assert torch.equal(prefix1[pad], prefix2[pad])
    # action tokens attend to each other (one bidirectional block): the last token's velocity changes
    assert (v1[:, -1] - v2[:, -1]).abs().max() > 1e-4
    with torch.no_grad():
        emb, pad = m.embed_prefix(**inp)
        kv1, _ = m.compute_prefix_cache(emb, pad)
        kv2, _ = m.compute_prefix_cache(emb, pad)
    for (k1, v1_), (k2, v2_) in zip(kv1, kv2, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1_, v2_)


def test_padding_tokens_and_masked_image_have_no_effect(policy, obs):
    m = policy.model
    inp, x = _inputs(policy, obs)
    base = m.sample_actions(noise=x, **inp)
    pad_positions = ~inp["token_masks"]
    assert pad_positions.any()
    changed = dict(inp)
    changed["tokens"] = torch.where(pad_positions, torch.full_like(inp["tokens"], 57), inp["tokens"])
    images = inp["images"].clone()
    images[:, 2] = torch.rand_like(images[:, 2]) * 2 - 1  # right wrist slot: mask False
    changed["images"] = images
    torch.testing.assert_close(m.sample_actions(noise=x, **changed), base, atol=1e-5, rtol=0)
    # ...while a real prompt token does matter
    real = dict(inp)
    toks = inp["tokens"].clone()
    toks[0, 1] = 57 if toks[0, 1] != 57 else 58
    real["tokens"] = toks
    assert (m.sample_actions(noise=x, **real) - base).abs().max() > 1e-4


def test_state_is_ignored_by_pi05_libero_but_used_with_discrete_state(policy, obs):
    o2 = dict(obs[0])
    o2["observation/state"] = obs[0]["observation/state"] + 0.5
    np.testing.assert_array_equal(policy.infer(obs[0], 1), policy.infer(o2, 1))  # pi05_libero
    tok = policy.tokenizer
    s = np.zeros(8, np.float32)
    assert tok.tokenize("open the drawer", s, "openpi")[1].sum() > tok.tokenize("open the drawer")[1].sum()


# ---------------------------------------------------------------- lerobot layout
def test_lerobot_layout_loads_with_same_weights_and_actions(policy, ckpt, obs, tmp_path):
    out = save_checkpoint(
        policy.model,
        policy.norm_stats,
        tmp_path / "lerobot",
        layout="lerobot",
        tokenizer_path=ckpt / "tokenizer.model",
    )
    assert detect_layout(out) == "lerobot"
    assert all(k.startswith("model.") for k in load_file(str(out / "model.safetensors")))
    lr = load_policy(out)
    assert lr.config.prompt_format == "lerobot" and len(lr.config.image_keys) == 2
    for (name, a), (_, b) in zip(
        policy.model.state_dict().items(), lr.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # lerobot writes the normalized state into the prompt: compare with the openpi layout told to do the same
    op = load_policy(ckpt, discrete_state_input=True)
    np.testing.assert_allclose(
        lr.infer_batch(obs[:2], [1, 2]), op.infer_batch(obs[:2], [1, 2]), atol=1e-4, rtol=0
    )


# ---------------------------------------------------------------- errors
def test_error_missing_weights(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights file model\.safetensors"):
        load_policy(d)


def test_error_missing_norm_stats(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    shutil.rmtree(d / "assets")
    with pytest.raises(CheckpointError, match=r"norm stats missing.*norm_stats\.json"):
        load_policy(d)


def test_error_norm_stats_without_quantiles(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    path = d / "assets/physical-intelligence/libero/norm_stats.json"
    data = json.loads(path.read_text())
    del data["norm_stats"]["actions"]["q99"]
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"norm_stats\.actions: missing \['q99'\]"):
        load_policy(d)


def _rewrite_weights(d, edit):
    path = d / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_error_wrong_shape(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    key = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(d, lambda t: t.__setitem__(key, torch.zeros(100, 64)))
    with pytest.raises(CheckpointError, match=rf"{key}: expected \[128, 64\], found \[100, 64\]"):
        load_policy(d)


def test_error_missing_key(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    key = "paligemma_with_expert.gemma_expert.model.layers.2.self_attn.k_proj.weight"
    _rewrite_weights(d, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"1 missing key.*{key}"):
        load_policy(d)


def test_error_unknown_key(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    _rewrite_weights(
        d, lambda t: t.__setitem__("paligemma_with_expert.gemma_expert.model.extra.weight", torch.zeros(2))
    )
    with pytest.raises(CheckpointError, match=r"1 unexpected key.*gemma_expert\.model\.extra\.weight"):
        load_policy(d)


def test_tied_lm_head_and_unused_expert_head_are_accepted(ckpt, tmp_path, obs, policy):
    """openpi's safetensors.save_model keeps the tied embedding under `paligemma.lm_head.weight`."""
    d = _copy(ckpt, tmp_path)
    emb = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"

    def edit(t):
        t["paligemma_with_expert.paligemma.lm_head.weight"] = t.pop(emb)
        t["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(10, 64)

    _rewrite_weights(d, edit)
    loaded = load_policy(d).model.state_dict()
    for name, value in policy.model.state_dict().items():
        assert torch.equal(loaded[name], value), name


def test_error_pi0_checkpoint(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path)
    _rewrite_weights(d, lambda t: t.__setitem__("state_proj.weight", torch.zeros(64, 32)))
    with pytest.raises(CheckpointError, match=r"pi0 checkpoint"):
        load_policy(d)


def test_error_missing_tokenizer(ckpt, tmp_path, monkeypatch):
    d = _copy(ckpt, tmp_path)
    (d / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"no PaliGemma tokenizer found.*OPENPI_TOKENIZER"):
        load_policy(d)
    monkeypatch.setenv("OPENPI_TOKENIZER", str(tmp_path / "nope.model"))
    with pytest.raises(CheckpointError, match=r"OPENPI_TOKENIZER=.*nope\.model: no such file"):
        load_policy(d)
    monkeypatch.setenv("OPENPI_TOKENIZER", str(ckpt / "tokenizer.model"))
    assert str(load_policy(d).tokenizer.path) == str(ckpt / "tokenizer.model")


def test_error_tokenizer_of_another_vocabulary(ckpt, tmp_path):
    """A trained checkpoint (no random_init_seed) with a tokenizer whose ids are in range but whose
    vocabulary is not the embedding's: refused, naming both files."""
    d = _copy(ckpt, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["pytest_duquant"].pop("random_init_seed")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tokenizer .*tokenizer\.model: \d+ pieces, but the token "
                       r"embedding in .*model\.safetensors has 257152 rows"):
        load_policy(d)
    assert load_policy(ckpt).tokenizer.vocab_size < 257152  # a random-init checkpoint keeps its tiny tokenizer


def test_error_lerobot_relative_actions(policy, ckpt, tmp_path):
    out = save_checkpoint(policy.model, policy.norm_stats, tmp_path / "lerobot", layout="lerobot",
                          tokenizer_path=ckpt / "tokenizer.model")
    cfg = json.loads((out / "config.json").read_text())
    cfg["use_relative_actions"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"use_relative_actions.* is true: .*relative to the current state"):
        load_policy(out)


def test_full_pi05_is_served_in_bf16_unless_float32_is_asked(monkeypatch):
    """openpi serves pi05_libero in bf16 whatever precision config.json records; tiny variants keep theirs."""
    from pytest_duquant.policies.pi05.checkpoint import DTYPE_VARIABLE, serving_precision
    from pytest_duquant.policies.pi05.configuration import variant_config

    monkeypatch.delenv(DTYPE_VARIABLE, raising=False)
    stored_fp32 = variant_config("pi05", precision="float32")
    assert serving_precision(stored_fp32) == "bfloat16"
    assert serving_precision(stored_fp32, "float32") == "float32"
    assert serving_precision(variant_config("dummy")) == "float32"
    monkeypatch.setenv(DTYPE_VARIABLE, "float32")
    assert serving_precision(stored_fp32) == "float32"
    monkeypatch.setenv(DTYPE_VARIABLE, "half")
    with pytest.raises(CheckpointError, match=DTYPE_VARIABLE):
        serving_precision(stored_fp32)


def test_weights_are_read_without_a_memory_map_and_equal_safetensors(ckpt, tmp_path):
    from pytest_duquant.policies.pi05.checkpoint import read_into

    ref = load_file(str(ckpt / "model.safetensors"))
    targets = {k: torch.empty_like(v) for k, v in ref.items()}
    targets["time_mlp_in.weight"] = torch.empty(ref["time_mlp_in.weight"].shape, dtype=torch.float64)  # cast
    read_into(ckpt / "model.safetensors", targets)
    for k, v in ref.items():
        assert torch.equal(targets[k], v.to(targets[k].dtype)), k
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((ckpt / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_into(cut, {k: torch.empty_like(v) for k, v in ref.items()})


def test_error_bad_observation(policy):
    with pytest.raises(CheckpointError, match=r"missing 'prompt'"):
        policy.infer(
            {
                "observation/image": np.zeros((224, 224, 3), np.uint8),
                "observation/wrist_image": np.zeros((224, 224, 3), np.uint8),
                "observation/state": np.zeros(8),
            },
            0,
        )


# ---------------------------------------------------------------- structure, list-linears, precision
def test_list_linears_full_pi05_on_meta(capsys):
    parser = argparse.ArgumentParser()
    list_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["list-linears", "pi05", "--json"])
    assert args.func(args) == 0
    listing = json.loads(capsys.readouterr().out)
    selected = [r for r in listing["linears"] if r["selected"]]
    assert len(selected) == 126 == listing["selected"]
    expected = {
        "q_proj": [2048, 1024],
        "k_proj": [256, 1024],
        "v_proj": [256, 1024],
        "o_proj": [1024, 2048],
        "gate_proj": [4096, 1024],
        "up_proj": [4096, 1024],
        "down_proj": [1024, 4096],
    }
    for layer in range(18):
        for sub, proj in [("self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            ("mlp", p) for p in ("gate_proj", "up_proj", "down_proj")
        ]:
            name = f"paligemma_with_expert.gemma_expert.model.layers.{layer}.{sub}.{proj}"
            row = next(r for r in selected if r["name"] == name)
            assert row["shape"] == expected[proj] and row["wbits"] == 4
    shapes = {r["name"]: r["shape"] for r in listing["linears"]}
    assert shapes["paligemma_with_expert.paligemma.model.multi_modal_projector.linear"] == [2048, 1152]
    assert shapes["paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense"] == [3072, 1024]
    assert shapes["action_in_proj"] == [1024, 32] and shapes["action_out_proj"] == [32, 1024]
    assert shapes["time_mlp_in"] == [1024, 1024]


def test_full_pi05_structure_on_meta():
    m = build_model(
        __import__("pytest_duquant.policies.pi05.configuration", fromlist=["x"]).variant_config("pi05"),
        device="meta",
        precision="bfloat16",
    )
    sd = m.state_dict()
    assert sd[
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight"
    ].shape == (1152, 3, 14, 14)
    assert sd[
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.position_embedding.weight"
    ].shape == (256, 1152)
    assert sd[
        "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc1.weight"
    ].shape == (4304, 1152)
    assert sd[
        "paligemma_with_expert.paligemma.model.language_model.layers.17.mlp.gate_proj.weight"
    ].shape == (16384, 2048)
    assert sd["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"].shape == (
        257152,
        2048,
    )
    # openpi's selective bf16: norms (incl. adaRMS dense) and patch/pos embeddings stay float32
    assert (
        sd["paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight"].dtype
        == torch.float32
    )
    assert sd["paligemma_with_expert.paligemma.model.language_model.norm.weight"].dtype == torch.float32
    assert sd["paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert sd["action_out_proj.weight"].dtype == torch.float32
    assert len(m.paligemma_with_expert.gemma_expert.model.layers) == 18


def test_bfloat16_policy_runs_and_tracks_float32(ckpt, obs):
    fp = load_policy(ckpt, dtype=torch.float32)
    bf = load_policy(ckpt, dtype=torch.bfloat16)
    assert (
        bf.model.paligemma_with_expert.gemma_expert.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    )
    a, b = fp.infer(obs[0], 4), bf.infer(obs[0], 4)
    assert np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.25 * np.abs(a).max()


def test_expert_layers_are_plain_linears_for_quantize_model(policy):
    layers = policy.model.paligemma_with_expert.gemma_expert.model.layers
    assert isinstance(layers[0].self_attn.q_proj, torch.nn.Linear)
    assert isinstance(layers[0].mlp.down_proj, torch.nn.Linear)


# ---------------------------------------------------------------- openpi adapter
def test_openpi_adapter_matches_builtin(obs):
    """Our backend vs openpi's own loader on a full-size checkpoint (DUQUANT_PI05_CKPT), same noise."""
    import os

    from pytest_duquant.policies.pi05 import openpi_adapter

    reason = openpi_adapter.unavailable_reason()
    if reason:
        pytest.skip(f"openpi is not importable here ({reason}); run inside an openpi checkout")
    ckpt = os.environ.get("DUQUANT_PI05_CKPT")
    if not ckpt:
        pytest.skip(
            "set DUQUANT_PI05_CKPT to a full-size pi05 checkpoint (openpi cannot build the dummy variant)"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = openpi_adapter.load_openpi_policy(ckpt, device=device)
    ours = load_policy(ckpt, device=device, dtype=torch.bfloat16)
    a, b = ref.infer_batch(obs, [3, 4, 5]), ours.infer_batch(obs, [3, 4, 5])
    assert np.abs(a - b).max() <= 0.02 * max(1.0, np.abs(a).max())
