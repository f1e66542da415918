"""The fast path's fused projections (`Pi05Model.fuse_fast_projections`: q/k/v and gate/up as one GEMM each,
the members' weights views into the fused weight) and its K/V buffer (`sample_actions_fast(kv_buffer=True)`:
the steps write their K/V behind the cached prefix instead of concatenating), docs/speed.md.

Tolerances as in test_fast.py: a fused GEMM computes the same dot products as the separate ones, the BLAS may
block them differently (float64 within 1e-12 of the reference, float32 within 1e-5); the K/V buffer holds the
same values in the same layout as the concatenation, so it is bitwise equal in eager mode.
"""

from __future__ import annotations

import pytest
import torch

from pytest_duquant.policies import build_policy, synthetic_observations
from pytest_duquant.policies.pi05.modeling import compact_prefix, short_query_attention

LONG = "pick up the black bowl between the plate and the ramekin and place it on the plate"


@pytest.fixture  # a fresh policy per test (they fuse and quantize it): overrides the module-scoped one
def dummy():
    return build_policy("dummy", seed=5)


@pytest.fixture(scope="module")
def obs():
    out = synthetic_observations(2, seed=21)
    out[0]["prompt"] = "open the drawer"
    out[1]["prompt"] = LONG
    return out


def _groups(model):
    pwe = model.paligemma_with_expert
    return [p for gm in (pwe.language_model, pwe.expert) for layer in gm.layers for p in (layer.self_attn, layer.mlp)]


def _fused_storage(parent):
    """The fused weight's storage pointer when every member's weight is a view into it, else None."""
    fp = parent.fused_projection()
    if fp is None:
        return None
    ptrs = {getattr(parent, n).weight.untyped_storage().data_ptr() for n in parent.FUSED_NAMES}
    return ptrs.pop() if ptrs == {fp.weight.untyped_storage().data_ptr()} else None


def test_fusion_makes_views_without_changing_weights_or_state_dict(dummy):
    m = dummy.model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params_before = sum(p.numel() for p in m.parameters())
    groups = _groups(m)
    assert m.fuse_fast_projections() == len(groups) == 16  # dummy: 2 models x 4 layers x (q/k/v, gate/up)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert sum(p.numel() for p in m.parameters()) == params_before  # the fused weight is no parameter
    for parent in groups:
        fp = parent.fused_projection()
        assert _fused_storage(parent) is not None  # views, no copy
        assert fp.weight.shape[0] == sum(getattr(parent, n).out_features for n in parent.FUSED_NAMES)
    attn = groups[0]
    assert torch.equal(attn.fused_projection().weight[: attn.q_proj.out_features], attn.q_proj.weight)
    # the unfused modules keep working: an in-place edit of a member shows in the fused weight
    with torch.no_grad():
        attn.k_proj.weight.mul_(2)
    start = attn.q_proj.out_features
    assert torch.equal(attn.fused_projection().weight[start : start + attn.k_proj.out_features], attn.k_proj.weight)
    assert m.fuse_fast_projections(False) == 0
    assert all(p.fused_projection() is None for p in groups)
    assert len({attn.q_proj.weight.untyped_storage().data_ptr(), attn.k_proj.weight.untyped_storage().data_ptr(),
                 attn.v_proj.weight.untyped_storage().data_ptr()}) == 3  # own storage again


@pytest.mark.parametrize("precision,atol", [("float64", 1e-12), ("float32", 1e-5)])
def test_fused_fast_path_equals_the_reference(dummy, obs, precision, atol):
    """Batch 1 and 2, with the K/V buffer and without, with the default and the short-query step attention;
    the reference path stays bit for bit what it was, fused or not."""
    m = dummy.model.set_precision(precision)
    inp, noise = dummy.prepare(obs), dummy.noise([1, 2])
    one = {k: v[:1] for k, v in inp.items()}
    ref, ref1 = m.sample_actions(noise=noise, **inp), m.sample_actions(noise=noise[:1], **one)
    plain = m.sample_actions_fast(noise=noise, **compact_prefix(**inp))
    m.fuse_fast_projections()
    assert torch.equal(m.sample_actions(noise=noise, **inp), ref)
    for kw in ({}, {"kv_buffer": True}, {"kv_buffer": True, "step_attn_fn": short_query_attention}):
        fast = m.sample_actions_fast(noise=noise, **kw, **compact_prefix(**inp))
        torch.testing.assert_close(fast, ref, atol=atol, rtol=0)
        fast1 = m.sample_actions_fast(noise=noise[:1], **kw, **compact_prefix(**one))
        torch.testing.assert_close(fast1, ref1, atol=atol, rtol=0)
    assert (ref[0] - ref[1]).abs().max() > 1e-3  # rows differ: a mixed-up row would fail
    m.fuse_fast_projections(False)
    assert torch.equal(m.sample_actions_fast(noise=noise, **compact_prefix(**inp)), plain)  # un-fused: as before


def test_fused_gemm_really_runs(dummy, obs, monkeypatch):
    """The fused path calls no member Linear of a fused group (a silent fallback would pass the value tests)."""
    m = dummy.model
    m.fuse_fast_projections()
    calls = []
    for parent in _groups(m):
        for n in parent.FUSED_NAMES:
            mod = getattr(parent, n)
            spy = lambda x, mod=mod, n=n: calls.append(n) or torch.nn.Linear.forward(mod, x)  # noqa: E731
            monkeypatch.setattr(mod, "forward", spy)
    inp, noise = dummy.prepare(obs[:1]), dummy.noise([1])
    m.sample_actions_fast(noise=noise, **compact_prefix(**inp))
    assert calls == []
    m.sample_actions(noise=noise, **inp)  # the reference path keeps the separate calls
    assert calls[:5] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_kv_buffer_is_bitwise_the_concatenation(dummy, obs, precision):
    m = dummy.model.set_precision(precision)
    inp, noise = dummy.prepare(obs), dummy.noise([3, 4])
    small = compact_prefix(**inp)
    for fused in (False, True):
        m.fuse_fast_projections(fused)
        cat = m.sample_actions_fast(noise=noise, **small)
        assert torch.equal(m.sample_actions_fast(noise=noise, kv_buffer=True, **small), cat)
    # the buffers: prefix in front, the steps' K/V behind, exactly the tensors the concatenation builds
    kv, pad = m.fast_prefix(small["images"], small["image_masks"], small["tokens"], small["token_masks"])
    bufs, _ = m.fast_prefix(small["images"], small["image_masks"], small["tokens"], small["token_masks"], kv_tail=10)
    p = pad.shape[1]
    assert bufs[0][0].shape == (2, 1, p + 10, kv[0][0].shape[-1]) and bufs[0][0].is_contiguous()
    pairs = [(b, c) for bb, cc in zip(bufs, kv, strict=True) for b, c in zip(bb, cc, strict=True)]
    assert len(pairs) == 8 and all(torch.equal(b[:, :, :p], c) for b, c in pairs)


def test_set_precision_and_to_keep_the_fusion(dummy, obs):
    """A conversion un-fuses, converts and fuses again: the fused weight follows the members' dtype."""
    m = dummy.model
    assert m.fuse_fast_projections() == 16
    m.set_precision("float64")
    attn = m.paligemma_with_expert.expert.layers[1].self_attn
    assert attn.fused_projection().weight.dtype == torch.float64 and _fused_storage(attn) is not None
    inp, noise = dummy.prepare(obs), dummy.noise([1, 2])
    ref = m.sample_actions(noise=noise, **inp)
    torch.testing.assert_close(m.sample_actions_fast(noise=noise, **compact_prefix(**inp)), ref, atol=1e-12, rtol=0)
    m.to(torch.float32)  # nn.Module.to directly: the same
    assert attn.fused_projection().weight.dtype == torch.float32 and _fused_storage(attn) is not None
    # a deep copy is not fused (deepcopy gives each parameter its own storage), the original stays fused
    import copy

    clone = copy.deepcopy(m)
    assert all(p.fused_projection() is None for p in _groups(clone)) and _fused_storage(attn) is not None
    assert clone.fuse_fast_projections() == 16
    # a member replaced behind the fusion's back is detected: that group falls back to the separate calls
    attn.q_proj = torch.nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    assert attn.fused_projection() is None


def test_quantized_expert_falls_back_and_keeps_its_actions(obs, tmp_path):
    """Fuse, then quantize the expert (preset B): quantization un-fuses the groups it replaces members of, the
    language model stays fused, and the fast path gives the same actions as the same model un-fused and as its
    reference path (float64; static activation scales calibrated on the reference path)."""
    from pytest_duquant.config import from_env, replace
    from pytest_duquant.layer import DuQuantLinear
    from pytest_duquant.policies import session

    policy = build_policy("dummy", seed=5)
    m = policy.model.set_precision("float64")
    assert m.fuse_fast_projections() == 16
    config = replace(from_env({}, preset="B"), packdir=str(tmp_path / "packs"), calib_steps=2)
    session.quantize_and_calibrate(policy, config, obs)
    pwe = m.paligemma_with_expert
    assert isinstance(pwe.expert.layers[0].self_attn.q_proj, DuQuantLinear)
    assert all(p.fused_projection() is None and "_fusion" not in p.__dict__ for p in _groups(m)[8:])  # expert
    assert all(p.fused_projection() is not None for p in _groups(m)[:8])  # language model untouched
    seeds = [1, 2]
    fused = policy.use_fast().raw_actions(obs, seeds)
    assert m.fuse_fast_projections() == 8  # fusing again: the quantized groups are skipped
    torch.testing.assert_close(policy.raw_actions(obs, seeds), fused, atol=1e-12, rtol=0)
    m.fuse_fast_projections(False)
    torch.testing.assert_close(policy.raw_actions(obs, seeds), fused, atol=1e-9, rtol=0)
    torch.testing.assert_close(policy.use_fast(False).raw_actions(obs, seeds), fused, atol=1e-9, rtol=0)
    fp = build_policy("dummy", seed=5)
    fp.model.set_precision("float64")
    assert (fp.raw_actions(obs, seeds) - fused).abs().max() > 1e-4  # really quantized


def test_saving_a_fused_model_writes_separate_tensors_that_reload_equal(dummy, obs, tmp_path):
    """The export gives each view its own storage (safetensors refuses shared storage, since 0.4 only when it
    overlaps). Loading reads
    into the parameters in place, so a fused model loads a checkpoint and stays fused (the views see it)."""
    from pytest_duquant.policies.pi05.checkpoint import WEIGHTS_NAME, _export_state, load_weights, save_checkpoint

    m = dummy.model
    m.fuse_fast_projections()
    exported = _export_state(m, "float32", False)  # safetensors before 0.4 refuses any shared storage
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in exported.values())
    inp, noise = dummy.prepare(obs), dummy.noise([1, 2])
    before = m.sample_actions_fast(noise=noise, **compact_prefix(**inp))
    save_checkpoint(m, dummy.norm_stats, tmp_path / "ckpt")
    assert all(_fused_storage(p) is not None for p in _groups(m))  # saving left the fusion in place
    other = build_policy("dummy", seed=6).model  # other weights, fused before loading
    assert other.fuse_fast_projections() == 16
    assert not torch.equal(other.sample_actions_fast(noise=noise, **compact_prefix(**inp)), before)
    load_weights(other, tmp_path / "ckpt" / WEIGHTS_NAME)
    state, again = m.state_dict(), other.state_dict()
    assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
    assert all(_fused_storage(p) is not None for p in _groups(other))
    assert torch.equal(other.sample_actions_fast(noise=noise, **compact_prefix(**inp)), before)


def test_compiled_step_with_fusion_and_kv_buffer_traces_as_one_graph(dummy, obs):
    """As test_fast's compile test: aot_eager, fullgraph; the fused weights and the mutated K/V buffers trace
    without a graph break, one graph for all 10 steps (and one for the prefix), values as the eager call."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = dummy.model.set_precision("float64")
    try:
        assert m.fuse_fast_projections() == 16
        inp, noise = dummy.prepare(obs), dummy.noise([1, 2])
        small = compact_prefix(**inp)
        eager = m.sample_actions_fast(noise=noise, kv_buffer=True, **small)
        m.compile_fast_step(backend="aot_eager", fullgraph=True, prefix=True)
        compiled = m.sample_actions_fast(noise=noise, kv_buffer=True, **small)
        again = m.sample_actions_fast(noise=noise, kv_buffer=True, **small)
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
        torch.testing.assert_close(compiled, eager, atol=1e-12, rtol=0)
        assert torch.equal(again, compiled)
        ref = m.sample_actions(noise=noise, **inp)
        torch.testing.assert_close(compiled, ref, atol=1e-12, rtol=0)
    finally:
        m.compile_fast_step(False)
        torch._dynamo.reset()
