"""The fast path's host work (docs/speed.md, "Serving"): images stay uint8 on the host (compacted and padded as
bytes), are moved, and become float on the device. The model must see exactly what it saw when the host
converted them first: the same float32 values bit for bit, in the same memory layout (a convolution's kernel
choice, hence its rounding, depends on the layout), and so the same actions bit for bit.

`_host_converted_inputs` is the fast path as it was before (prepare_inputs(..., "cpu") with float images, then
compact_prefix, pad_rows, move): the reference every test compares against.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pytest_duquant.policies import build_policy, synthetic_observations
from pytest_duquant.policies.pi05 import policy as policy_module
from pytest_duquant.policies.pi05.configuration import variant_config
from pytest_duquant.policies.pi05.modeling import compact_prefix
from pytest_duquant.policies.pi05.policy import batch_chunks, noise_for_seed, pad_rows
from pytest_duquant.policies.pi05.processing import (
    build_inputs,
    images_to_float,
    images_to_float_as_host,
    pixel_table,
    prepare_inputs,
)


@pytest.fixture(scope="module")
def two_slots():
    """Both slots present (lerobot-like layout): nothing is compacted, so an unpadded batch keeps the
    channels-last view of the float images."""
    config = variant_config("dummy", image_keys=("base_0_rgb", "left_wrist_0_rgb"), image_present=(True, True))
    return build_policy("dummy", seed=6, config=config)


def _observations(n: int, seed: int = 3) -> list[dict]:
    out = synthetic_observations(n, seed=seed, image_size=224)
    out[0]["prompt"] = "open the drawer"  # prompts of different lengths
    # every byte value in the first image: each of the 256 conversions is checked
    out[0]["observation/image"] = np.tile(np.arange(256, dtype=np.uint8), 224 * 224 * 3 // 256 + 1)[
        : 224 * 224 * 3
    ].reshape(224, 224, 3)
    return out


def _mask_wrist(rows):
    """A build_inputs that masks the wrist slot (1) in `rows` only (the slot is kept: other rows use it)."""
    real = build_inputs

    def build(*args, **kwargs):
        inputs = real(*args, **kwargs)
        inputs["image_masks"][rows, 1] = False
        return inputs

    return build


def _host_converted_inputs(policy, observations, seeds, build=build_inputs):
    """The fast path before this change, chunk by chunk: [(inputs the model got, noise)]."""
    inputs = build(list(observations), policy.config, policy.norm_stats, policy.tokenizer)
    inputs["images"] = images_to_float(inputs["images"])  # prepare_inputs(..., "cpu")
    noise = torch.stack([noise_for_seed(s, policy.config.action_horizon, policy.config.action_dim) for s in seeds])
    out = []
    for start, stop, size in batch_chunks(len(seeds), policy.batch_sizes):
        part = compact_prefix(**{k: v[start:stop] for k, v in inputs.items()}, token_bucket=policy.token_bucket)
        part, part_noise = pad_rows(part, noise[start:stop], size)
        out.append(({k: v.to(policy.device) for k, v in part.items()}, part_noise.to(policy.device)))
    return out


def _served_inputs(policy, observations, seeds):
    """raw_actions on the fast path, with what the sampler was called with recorded."""
    calls = []
    sample = policy._sample

    def recording(**kwargs):
        calls.append(kwargs)
        return sample(**kwargs)

    policy._sample = recording
    try:
        actions = policy.raw_actions(observations, seeds)
    finally:
        policy._sample = sample
    return actions, calls


@pytest.fixture(params=["formula", "table"])
def conversion(request, monkeypatch):
    """The fast path converts with the formula on a CPU and by the table on a GPU: on this CPU, both."""
    if request.param == "table":
        monkeypatch.setattr(policy_module, "images_to_float_as_host", _forced_table)
    return request.param


def _forced_table(pixels, **kwargs):
    assert kwargs.pop("lookup", None) is None
    _forced_table.calls += 1
    return images_to_float_as_host(pixels, lookup=True, **kwargs)


_forced_table.calls = 0


def _assert_same_tensor(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, what
    assert a.stride() == b.stride(), (what, a.stride(), b.stride())
    assert torch.equal(a, b), what
    if a.is_floating_point():  # torch.equal says -0.0 == 0.0; the bits must match too
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), what


def test_pixel_table_is_the_cpus_division():
    """The table is x / 255 * 2 - 1 with a true float32 division (an independent numpy oracle), not the
    multiplication by the reciprocal that CUDA does for a Python divisor (which the oracle tells apart)."""
    x = np.arange(256, dtype=np.float32)
    division = x / np.float32(255) * np.float32(2) - np.float32(1)
    reciprocal = x * (np.float32(1) / np.float32(255)) * np.float32(2) - np.float32(1)
    table = pixel_table("cpu")
    assert table.dtype == torch.float32 and table.shape == (256,)
    assert np.array_equal(table.numpy().view(np.int32), division.view(np.int32))
    assert (division != reciprocal).sum() == 111  # what converting on the GPU by the formula would change
    assert table[0] == -1 and table[255] == 1


def test_device_conversion_equals_prepare_inputs_bitwise(dummy):
    obs = _observations(2)
    ref = prepare_inputs(obs, dummy.config, dummy.norm_stats, dummy.tokenizer, "cpu")
    host = build_inputs(obs, dummy.config, dummy.norm_stats, dummy.tokenizer)
    pix = host["images"]
    assert pix.dtype == torch.uint8 and pix.shape == (2, 3, 224, 224, 3)
    assert len(torch.unique(pix[0, 0])) == 256  # every byte value is converted below
    for k in ("image_masks", "tokens", "token_masks"):
        _assert_same_tensor(host[k], ref[k], k)
    assert ref["images"].shape == (2, 3, 3, 224, 224)
    for lookup in (True, False):
        view = images_to_float_as_host(pix, lookup=lookup)
        _assert_same_tensor(view, ref["images"], f"lookup={lookup}")  # the channels-last view, as prepare_inputs'
        dense = images_to_float_as_host(pix, lookup=lookup, contiguous=True)
        assert dense.is_contiguous() and not view.is_contiguous()
        _assert_same_tensor(dense, ref["images"].contiguous(), f"lookup={lookup}, contiguous")
    # the layout [B, N, 3, H, W]: channel c of pixel (y, x) of image (b, n)
    assert ref["images"][0, 1, 2, 5, 7] == pixel_table()[int(pix[0, 1, 5, 7, 2])]
    with pytest.raises(TypeError, match="uint8"):
        images_to_float_as_host(ref["images"])


@pytest.mark.parametrize(
    "n,masked_rows",
    [(1, []), (3, []), (3, [1]), (7, [0, 2, 6])],
    ids=["batch1", "batch3-padded", "batch3-wrist-masked-in-row1", "batch7-padded-wrist-masked-in-3-rows"],
)
def test_fast_path_inputs_and_actions_bitwise_as_host_converted(dummy, monkeypatch, conversion, n, masked_rows):
    dummy.use_fast()
    calls_before = _forced_table.calls
    try:
        build = _mask_wrist(masked_rows) if masked_rows else build_inputs
        monkeypatch.setattr(policy_module, "build_inputs", build)
        obs, seeds = _observations(n), list(range(10, 10 + n))
        (ref_inputs, ref_noise), = _host_converted_inputs(dummy, obs, seeds, build)
        actions, calls = _served_inputs(dummy, obs, seeds)
        assert len(calls) == 1
        got = calls[0]
        assert sorted(got) == ["image_masks", "images", "noise", "token_masks", "tokens"]
        size = {1: 1, 3: 4, 7: 8}[n]
        assert got["images"].shape == (size, 2, 3, 224, 224)  # padded, the empty right-wrist slot dropped
        assert got["images"].is_contiguous()
        _assert_same_tensor(got["noise"], ref_noise, "noise")
        for k, v in ref_inputs.items():
            _assert_same_tensor(got[k], v, k)
        assert [r for r in range(n) if not got["image_masks"][r, 1]] == masked_rows
        ref_actions = dummy.model.sample_actions_fast(noise=ref_noise, **ref_inputs)[:n]
        _assert_same_tensor(actions, ref_actions, "actions")
        if n > 1:
            assert (actions[0] - actions[1]).abs().max() > 1e-3  # rows differ: a mixed-up row would show
        assert _forced_table.calls == calls_before + (conversion == "table")
    finally:
        dummy.use_fast(False)


@pytest.mark.parametrize("n,batch_sizes", [(4, (1, 2, 4, 8)), (6, (2, 4)), (3, (4,)), (3, None)])
def test_fast_path_keeps_the_layout_when_nothing_is_compacted(two_slots, conversion, n, batch_sizes):
    """Nothing compacted and no padding: the float images were the channels-last view, and still are (batch 4 of
    (1, 2, 4, 8); batch 6 in chunks of 4 and 2; unpadded); padded (batch 3 to 4): contiguous, as before."""
    two_slots.use_fast(batch_sizes=batch_sizes)
    try:
        obs, seeds = _observations(n, seed=9), list(range(n))
        ref = _host_converted_inputs(two_slots, obs, seeds)
        actions, calls = _served_inputs(two_slots, obs, seeds)
        assert len(calls) == len(ref) == (2 if n == 6 else 1)
        padded = batch_sizes == (4,)
        for got, (ref_inputs, ref_noise) in zip(calls, ref, strict=True):
            assert got["images"].shape[1] == 2 and got["images"].is_contiguous() == padded
            _assert_same_tensor(got["noise"], ref_noise, "noise")
            for k, v in ref_inputs.items():
                _assert_same_tensor(got[k], v, k)
        ref_actions = torch.cat(
            [two_slots.model.sample_actions_fast(noise=nz, **inp) for inp, nz in ref]
        )[:n]
        _assert_same_tensor(actions, ref_actions, "actions")
    finally:
        two_slots.use_fast(False)


def test_exact_path_unchanged(dummy):
    """The exact path still converts with prepare_inputs on the policy's device (its own formula there)."""
    obs, seeds = _observations(2), [1, 2]
    inputs = prepare_inputs(obs, dummy.config, dummy.norm_stats, dummy.tokenizer, dummy.device)
    ref = dummy.model.sample_actions(noise=dummy.noise(seeds), **inputs)
    _assert_same_tensor(dummy.raw_actions(obs, seeds), ref, "actions")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_path_inputs_are_the_hosts_bitwise():
    """On a GPU: the uint8 images go through pinned memory and the table; the model gets the host's floats (the
    formula on the GPU would not give them: test_pixel_table_is_the_cpus_division)."""
    gpu = build_policy("dummy", seed=5, device="cuda", fast=True)
    obs, seeds = _observations(7), list(range(7))
    assert gpu.pin_memory
    (ref_inputs, ref_noise), = _host_converted_inputs(gpu, obs, seeds)
    actions, calls = _served_inputs(gpu, obs, seeds)
    for k, v in ref_inputs.items():
        _assert_same_tensor(calls[0][k], v, k)
    ref_actions = gpu.model.sample_actions_fast(noise=ref_noise, **ref_inputs)[:7]
    _assert_same_tensor(actions, ref_actions, "actions")
    pix = build_inputs(obs, gpu.config, gpu.norm_stats, gpu.tokenizer)["images"]
    _assert_same_tensor(images_to_float_as_host(pix.cuda()).cpu(), images_to_float(pix), "images")
