"""The fast pi0.5 call (issue 14, docs/speed.md) against openpi's exact path.

Tolerances, and why:
- compaction (masked image slots and trailing prompt padding dropped) changes no value that is computed, only
  how many masked keys with weight exactly 0 the softmax and the value product sum over, and in which order
  the BLAS groups the rest: float64 actions agree to 1e-12 (measured ~1e-15), float32 to 1e-5 (~1e-6);
- fused attention (scaled_dot_product_attention) is the same math with the softmax kept in float32: the same
  bounds in float32 / float64. In bfloat16 it skips openpi's rounding of the scores and probabilities to bf16,
  so it differs from the bf16 reference by bf16 rounding; the bound used is that the fast bf16 call is no
  further from the float32 model than openpi's own bf16 call is (x 1.5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_duquant.policies import build_policy, load_policy, synthetic_observations
from pytest_duquant.policies.pi05.modeling import (
    attention,
    compact_prefix,
    fold_mask_heads,
    fused_attention,
    short_query_attention,
)
from pytest_duquant.policies.pi05.policy import batch_chunks, pad_rows

LONG = "pick up the black bowl between the plate and the ramekin and place it on the plate"


@pytest.fixture(scope="module")
def obs():
    out = synthetic_observations(3, seed=21)
    out[0]["prompt"] = "open the drawer"  # prompts of different lengths in one batch
    out[1]["prompt"] = LONG
    return out


def _inputs(policy, obs, seeds):
    return policy.prepare(obs), policy.noise(seeds)


def test_compact_prefix_drops_only_what_is_masked_everywhere(dummy, obs):
    inp = dummy.prepare(obs)
    lengths = inp["token_masks"].sum(1)
    assert len(set(lengths.tolist())) == 3 and not inp["image_masks"][:, 2].any()  # LIBERO: 3rd slot empty
    c = compact_prefix(**inp, token_bucket=8)
    assert c["images"].shape[1] == 2 and torch.equal(c["images"], inp["images"][:, :2])
    n = c["tokens"].shape[1]
    assert n % 8 == 0 and int(lengths.max()) <= n < int(lengths.max()) + 8
    assert torch.equal(c["token_masks"], inp["token_masks"][:, :n]) and not inp["token_masks"][:, n:].any()
    # a slot masked in some rows only stays (masked there); nothing valid is ever dropped
    mixed = dict(inp, image_masks=inp["image_masks"].clone())
    mixed["image_masks"][0, 2] = True
    assert compact_prefix(**mixed)["images"].shape[1] == 3
    # at least one bucket, at most the original length
    none = dict(inp, token_masks=torch.zeros_like(inp["token_masks"]))
    assert compact_prefix(**none, token_bucket=16)["tokens"].shape[1] == 16
    assert compact_prefix(**inp, token_bucket=10_000)["tokens"].shape[1] == inp["tokens"].shape[1]
    with pytest.raises(ValueError, match="token_bucket"):
        compact_prefix(**inp, token_bucket=0)


@pytest.mark.parametrize("precision,atol", [("float64", 1e-12), ("float32", 1e-5)])
def test_fast_path_equals_the_reference_dummy(dummy, obs, precision, atol):
    """Batch 1 and 2 (prompts of 2 lengths), the empty slot masked, one row's wrist image masked too; with
    openpi's eager attention (compaction alone) and with the fused one."""
    m = dummy.model.set_precision(precision)
    try:
        inp, noise = _inputs(dummy, obs[:2], [1, 2])
        inp["image_masks"][1, 1] = False  # a slot masked in one row only: kept, and must still change nothing
        inp["images"][1, 1] = torch.rand_like(inp["images"][1, 1]) * 2 - 1
        ref = m.sample_actions(noise=noise, **inp)
        one = {k: v[:1] for k, v in inp.items()}
        ref1 = m.sample_actions(noise=noise[:1], **one)
        for attn in (attention, fused_attention):
            fast = m.sample_actions_fast(noise=noise, attn_fn=attn, **compact_prefix(**inp, token_bucket=8))
            torch.testing.assert_close(fast, ref, atol=atol, rtol=0)
            fast1 = m.sample_actions_fast(noise=noise[:1], attn_fn=attn, **compact_prefix(**one))
            torch.testing.assert_close(fast1, ref1, atol=atol, rtol=0)
        assert (ref[0] - ref[1]).abs().max() > 1e-3  # the rows really differ: a mixed-up row would fail
    finally:
        m.set_precision("float32")


@pytest.mark.parametrize("precision,atol", [("float64", 1e-12), ("float32", 1e-5)])
def test_fast_path_equals_the_reference_trained_reference_policy(obs, precision, atol):
    from pytest_duquant.policies import reference as ref_pkg

    ref_policy = load_policy(ref_pkg.reference_checkpoint())
    ref_policy.model.set_precision(precision)
    fast_policy = load_policy(ref_pkg.reference_checkpoint(), fast=True)
    fast_policy.model.set_precision(precision)
    seeds = [4, 5, 6]
    ref = ref_policy.raw_actions(obs, seeds)
    fast = fast_policy.raw_actions(obs, seeds)
    torch.testing.assert_close(fast, ref, atol=atol, rtol=0)
    torch.testing.assert_close(fast_policy.raw_actions(obs[1:2], [5]), ref[1:2], atol=atol, rtol=0)


def test_fast_bf16_is_no_further_from_float32_than_openpis_bf16(obs):
    policy = build_policy("dummy", seed=5)
    m = policy.model
    inp, noise = _inputs(policy, obs, [1, 2, 3])
    f32 = m.sample_actions(noise=noise, **inp)
    m.set_precision("bfloat16")
    ref_bf16 = m.sample_actions(noise=noise, **inp)
    fast_bf16 = m.sample_actions_fast(noise=noise, **compact_prefix(**inp))
    ref_err = (ref_bf16 - f32).abs().max().item()
    fast_err = (fast_bf16 - f32).abs().max().item()
    assert 0 < ref_err < 0.05, ref_err  # bf16 really is in play
    assert fast_err <= 1.5 * ref_err, (fast_err, ref_err)
    assert (fast_bf16 - ref_bf16).abs().max().item() <= 2 * ref_err


def test_fused_attention_equals_eager_with_gradients():
    """Training's use: values and gradients of the fused attention agree with the eager one (float64)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    allowed = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    allowed[..., 0] = True
    mask = torch.where(allowed, 0.0, -2.3819763e38).to(torch.float64)
    outs, grads = [], []
    for fn in (attention, fused_attention):
        out = fn(q, k, v, mask, 8**-0.5)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=0)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    from pytest_duquant.training import flow

    assert flow.fused_attention is fused_attention  # training uses the model's one


def test_fast_call_computes_only_the_valid_prefix(dummy, obs, monkeypatch):
    """The work saved: the language model runs on 2 images + one prompt bucket, not 3 images + 200 tokens."""
    pwe = dummy.model.paligemma_with_expert
    seen = []
    orig = pwe.run_layers

    def spy(xs, *args, **kwargs):
        if xs[0] is not None:
            seen.append(xs[0].shape[1])
        return orig(xs, *args, **kwargs)

    monkeypatch.setattr(pwe, "run_layers", spy)
    dummy.raw_actions(obs[:1], [0])
    dummy.use_fast()
    try:
        dummy.raw_actions(obs[:1], [0])
    finally:
        dummy.use_fast(False)
    assert seen == [3 * 256 + 200, 2 * 256 + 32], seen


def test_batch_chunks_and_padding():
    assert batch_chunks(3, (1, 2, 4, 8)) == [(0, 3, 4)]
    assert batch_chunks(8, (1, 2, 4, 8)) == [(0, 8, 8)]
    assert batch_chunks(11, (1, 2, 4)) == [(0, 4, 4), (4, 8, 4), (8, 11, 4)]
    assert batch_chunks(5, None) == [(0, 5, 5)]
    inputs = {"a": torch.arange(6).view(3, 2)}
    padded, noise = pad_rows(inputs, torch.tensor([1.0, 2.0, 3.0]), 5)
    assert padded["a"].tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]] and noise.tolist()[3:] == [3.0, 3.0]
    with pytest.raises(ValueError, match="cannot pad"):
        pad_rows(inputs, torch.zeros(3), 2)


def test_padded_rows_change_no_real_row(obs):
    """3 observations served as a padded batch of 8, as chunks of 2 (2 + padded 2), and unpadded: one answer,
    and the reference's (float64: rounding differences stay below 1e-12)."""
    policy = build_policy("dummy", seed=5, fast=True)
    policy.model.set_precision("float64")
    seeds = [7, 8, 9]
    padded = policy.use_fast(batch_sizes=(8,)).raw_actions(obs, seeds)
    chunked = policy.use_fast(batch_sizes=(2,)).raw_actions(obs, seeds)
    plain = policy.use_fast(batch_sizes=None).raw_actions(obs, seeds)
    assert padded.shape == chunked.shape == plain.shape == (3, 10, 32)
    torch.testing.assert_close(padded, plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(chunked, plain, atol=1e-12, rtol=0)
    ref = policy.use_fast(False).raw_actions(obs[1:2], seeds[1:2])
    torch.testing.assert_close(plain[1:2], ref, atol=1e-12, rtol=0)
    np.testing.assert_allclose(policy.use_fast().infer(obs[1], 8), policy.use_fast(False).infer(obs[1], 8),
                               atol=1e-9, rtol=0)


def test_served_options_keep_the_reference_actions(obs):
    """serve_fast(short_query=True, fuse=True): the steps' short-query attention, fused projections and the K/V
    buffer change float rounding only (float64 within 1e-12 of the exact path); served plain again, un-fused."""
    policy = build_policy("dummy", seed=5, fast=True)
    policy.model.set_precision("float64")
    seeds = [7, 8, 9]
    ref = policy.use_fast(False).raw_actions(obs, seeds)
    served = policy.serve_fast(short_query=True, fuse=True).raw_actions(obs, seeds)
    assert policy.fast_options["kv_buffer"] and policy.fast_options["step_attn_fn"] is short_query_attention
    mlp = policy.model.paligemma_with_expert.expert.layers[0].mlp
    assert mlp.fused_projection() is not None
    torch.testing.assert_close(served, ref, atol=1e-12, rtol=0)
    plain = policy.serve_fast().raw_actions(obs, seeds)
    assert policy.fast_options == {} and mlp.fused_projection() is None
    torch.testing.assert_close(plain, ref, atol=1e-12, rtol=0)


def test_fast_path_of_a_quantized_expert_matches_its_reference_path(obs, tmp_path):
    """The harness serves quantized policies through the fast path too: same actions (float64 model, preset B
    with static activation scales calibrated on the reference path)."""
    from pytest_duquant.config import from_env, replace
    from pytest_duquant.policies import session

    policy = build_policy("dummy", seed=5)
    policy.model.set_precision("float64")
    config = replace(from_env({}, preset="B"), packdir=str(tmp_path / "packs"), calib_steps=2)
    session.quantize_and_calibrate(policy, config, obs)
    seeds = [1, 2, 3]
    ref = policy.raw_actions(obs, seeds)
    fast = policy.use_fast().raw_actions(obs, seeds)
    torch.testing.assert_close(fast, ref, atol=1e-9, rtol=0)
    fp = build_policy("dummy", seed=5)
    fp.model.set_precision("float64")
    assert (fp.raw_actions(obs, seeds) - ref).abs().max() > 1e-4  # really quantized


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (scripts/gpu_speed_job.py)")
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_graphed_fast_path_equals_eager_fast_path_on_gpu(obs, dtype, atol):
    """Replays are bitwise reproducible; against the eager call the same kernels run, but cuBLAS may pick
    another algorithm under capture, so float rounding of the dtype is allowed there."""
    policy = build_policy("dummy", seed=5, dtype=dtype, device="cuda", fast=True)
    eager = policy.raw_actions(obs, [1, 2, 3])
    reference = build_policy("dummy", seed=5, dtype=dtype, device="cuda").raw_actions(obs, [1, 2, 3])
    graphed = policy.cuda_graph()
    first = graphed.raw_actions(obs, [1, 2, 3])  # capture
    second = graphed.raw_actions(obs, [1, 2, 3])  # replay
    assert torch.equal(first, second)
    torch.testing.assert_close(second, eager, atol=atol, rtol=0)
    torch.testing.assert_close(second, reference, atol=atol, rtol=0)
    assert len(policy._sample.graphs) == 1  # 3 rows padded to 4: one graph
    torch.testing.assert_close(graphed.raw_actions(obs[:1], [1]), eager[:1], atol=atol, rtol=0)
    assert len(policy._sample.graphs) == 2  # batch 1: its own graph


@pytest.mark.parametrize("prefix", [False, True], ids=["step", "step_and_prefix"])
def test_compiled_step_traces_as_one_graph_reused_by_every_step(dummy, obs, prefix):
    """`compile_fast_step` (docs/speed.md): the Euler step traces without a graph break (fullgraph) and is
    compiled once for all 10 steps (with ``prefix``, the prefix is a second graph); aot_eager (no code
    generation, so no C++ compiler needed here) replays the same ATen ops, so the actions are equal to the eager
    fast path's in float64."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = dummy.model.set_precision("float64")
    try:
        inp, noise = _inputs(dummy, obs, [1, 2, 3])
        small = compact_prefix(**inp)
        eager = m.sample_actions_fast(noise=noise, **small)
        m.compile_fast_step(backend="aot_eager", fullgraph=True, prefix=prefix)
        compiled = m.sample_actions_fast(noise=noise, **small)
        again = m.sample_actions_fast(noise=noise, **small)
        assert counters["stats"]["unique_graphs"] == 1 + prefix and not counters["graph_break"]
        assert ("_compiled_prefix" in m.__dict__) == prefix
        torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=0)
        assert torch.equal(again, compiled)
        m.compile_fast_step(False)
        assert "_compiled_step" not in m.__dict__ and "_compiled_prefix" not in m.__dict__
        assert torch.equal(m.sample_actions_fast(noise=noise, **small), eager)
    finally:
        m.compile_fast_step(False)
        m.set_precision("float32")
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU kernels need a GPU (gpu_speed_job.py)")
@pytest.mark.parametrize("prefix", [False, True], ids=["step", "step_and_prefix"])
def test_compiled_graphed_fast_path_matches_eager_on_gpu(obs, prefix):
    """Inductor fuses the step's elementwise work into new kernels: float32 rounding of reordered sums."""
    policy = build_policy("dummy", seed=5, dtype="float32", device="cuda", fast=True)
    eager = policy.raw_actions(obs, [1, 2, 3])
    policy.serve_fast(compile_step=True, compile_prefix=prefix)
    first = policy.raw_actions(obs, [1, 2, 3])
    assert torch.equal(first, policy.raw_actions(obs, [1, 2, 3]))
    torch.testing.assert_close(first, eager, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_short_query_attention_is_the_eager_attention(dtype, atol):
    """One KV head (folded or plain mask, a masked key range per row) and a GQA shape (falls back)."""
    g = torch.Generator().manual_seed(3)
    b, hq, t, d, s = 2, 8, 10, 64, 37
    q = torch.randn(b, hq, t, d, dtype=dtype, generator=g)
    k, v = (torch.randn(b, 1, s, d, dtype=dtype, generator=g) for _ in range(2))
    mask = torch.zeros(b, 1, t, s, dtype=dtype)
    mask[0, ..., 30:] = torch.finfo(dtype).min
    mask[1, ..., :3] = torch.finfo(dtype).min
    ref = attention(q, k, v, mask, 0.125)
    torch.testing.assert_close(short_query_attention(q, k, v, mask, 0.125), ref, atol=atol, rtol=0)
    torch.testing.assert_close(short_query_attention(q, k, v, fold_mask_heads(mask, hq), 0.125), ref, atol=atol,
                               rtol=0)
    assert (ref - attention(q, k, v, torch.zeros_like(mask), 0.125)).abs().max() > 1e-2  # the mask matters
    k2, v2 = (torch.randn(b, 2, s, d, dtype=dtype, generator=g) for _ in range(2))
    torch.testing.assert_close(short_query_attention(q, k2, v2, mask, 0.125), attention(q, k2, v2, mask, 0.125),
                               atol=atol, rtol=0)


@pytest.mark.parametrize("precision,atol", [("float64", 1e-12), ("float32", 1e-5)])
def test_fast_path_with_short_query_attention_in_the_steps_equals_the_reference(dummy, obs, precision, atol):
    m = dummy.model.set_precision(precision)
    try:
        inp, noise = _inputs(dummy, obs, [1, 2, 3])
        ref = m.sample_actions(noise=noise, **inp)
        fast = m.sample_actions_fast(noise=noise, step_attn_fn=short_query_attention, **compact_prefix(**inp))
        torch.testing.assert_close(fast, ref, atol=atol, rtol=0)
    finally:
        m.set_precision("float32")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_rope_with_swapped_halves_is_openpis_rope_bit_for_bit(dtype):
    """run_layers applies RoPE as q * cos + swap_halves(q) * signed_sin (one launch fewer than openpi's
    rotate_half form); negation is exact and a product's sign symmetric, so the values are the same bits."""
    from pytest_duquant.policies.pi05.modeling import _rotate_half, _signed_sin, _swap_halves

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 8, 256, generator=g).to(dtype).transpose(1, 2)  # [B, heads, T, D], strided as in use
    cos, sin = (torch.randn(2, 1, 10, 256, generator=g).to(dtype) for _ in range(2))
    openpi = x * cos + _rotate_half(x) * sin
    ours = x * cos + _swap_halves(x) * _signed_sin(sin)
    assert torch.equal(ours, openpi)
    assert not torch.equal(ours, x * cos + _swap_halves(x) * sin)  # the sign really matters


def test_random_weights_drawn_on_the_device_have_the_init_scales():
    """`random_model(..., draw_on_device=True)` (timing builds): other values than the deterministic CPU draw,
    the same scales (a Linear's weight ~ N(0, 1/fan_in))."""
    from pytest_duquant.policies.pi05.configuration import variant_config
    from pytest_duquant.policies.pi05.modeling import random_model

    config = variant_config("dummy")
    fixed = random_model(config, 0, "float32")
    drawn = random_model(config, 0, "float32", draw_on_device=True)
    w_fixed = fixed.paligemma_with_expert.expert.layers[0].mlp.down_proj.weight.detach()
    w_drawn = drawn.paligemma_with_expert.expert.layers[0].mlp.down_proj.weight.detach()
    assert not torch.equal(w_fixed, w_drawn)
    expected = w_drawn.shape[1] ** -0.5
    assert abs(float(w_drawn.std()) / expected - 1) < 0.05 and abs(float(w_fixed.std()) / expected - 1) < 0.05
    again = random_model(config, 0, "float32", draw_on_device=True)
    assert torch.equal(again.paligemma_with_expert.expert.layers[0].mlp.down_proj.weight, w_drawn)  # seeded
