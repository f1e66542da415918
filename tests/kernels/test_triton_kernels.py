"""GPU correctness of the Triton kernels against their torch twins (marker gpu; skipped without CUDA).

Every run draws fresh random inputs, and every buffer the launchers allocate starts poisoned (NaN for
floats, 99 for int8), so an element a kernel forgets to write fails the comparison.
"""

import dataclasses

import pytest
import torch

from pytest_duquant.kernels import reference as ref
from pytest_duquant.kernels.bench import EXPERT_SHAPES, synth_layer
from pytest_duquant.kernels.packs import make_w4a8_group, make_w4a8_pack

pytestmark = pytest.mark.gpu
MS = (1, 16, 50, 64, 256, 800, 4096)
SHAPES = [pytest.param(k, n, id=f"{k}to{n}") for k, n in EXPERT_SHAPES]


@pytest.fixture(scope="module")
def tk():
    pytest.importorskip("triton", reason="triton is not installed")
    from pytest_duquant.kernels import triton_kernels

    triton_kernels.POISON = True
    yield triton_kernels
    triton_kernels.POISON = False


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "kernel output has NaN/Inf (unwritten or overflow)"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _same_within_quantization_noise(path, other, fp) -> tuple[float, float]:
    """Two W4A8 kernel paths of one quantized module, and the float module's output: their difference must be
    under a quarter of the quantization error itself. A bf16 rounding of an intermediate (the GeGLU product, an
    inductor-fused elementwise op) moves dynamic int8 activation codes across a rounding boundary, so the paths
    differ by ~1 % (measured on the H200: 1.15-1.32 %, preset A), while W4A8's own error is several times that;
    a wrong transform, scale or code would make the difference as large as the error or larger."""
    diff, noise = _rel(path, other.float()), _rel(other, fp.float())
    assert diff <= 0.25 * noise and _rel(path, fp.float()) <= 1.1 * noise, (diff, noise)
    return diff, noise


def _configs(tk, m, n, k):
    pick = tk.pick_config(m, n, k)
    n_kt = k // 128
    other = [
        tk.GemmConfig(path="L", bm=16 if m <= 64 else 64, bn=64, split_k=1, warps=4, stages=3),
        tk.GemmConfig(path="S", bm=16 if m <= 64 else 64, bn=128, split_k=min(4, n_kt), warps=4, stages=3),
        tk.small_config(m, n, k, bt=16, split=min(4, n_kt)),
        tk.small_config(m, n, k, bt=64, split=min(2, n_kt)),
        tk.small_config(m, n, k, bt=32, split=min(8, n_kt), codes=True),
        tk.GemmConfig(path="Q", bm=64 if m <= 256 else 128, bn=128, split_k=1, warps=4, stages=3),
    ]
    return [pick] + [c for c in other if c != pick]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES)
def test_gemm_int32_accumulator_exact(tk, k, n, m):
    """Both A modes and split-K: y * 16 equals the exact integer product of the same codes."""
    dev = "cuda"
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev)
    a[:, 0] = 127  # every row's max |code| is 127, so the fp32 path's scale is exactly 2^-4
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
    r = torch.eye(16, device=dev).expand(k // 16, 16, 16)
    pack = make_w4a8_pack(perm=None, r_in=r, w_codes=w, w_scales=torch.ones(n, device=dev))
    expect = ref.int_acc_ref(a, w)
    xt = a.float() * 2.0**-4
    pm = xt.abs().view(m, k // 64, 64).amax(-1)
    for cfg in _configs(tk, m, n, k):
        if cfg.path in ("L", "Q", "C"):
            y = tk.w4a8_gemm(
                a,
                torch.full((m,), 2.0**-4, device=dev),
                pack,
                cfg,
                a_float=False,
                out_dtype=torch.float32,
                epilogue=False,
                w_int8=tk.unpack_weight_int8(pack) if cfg.path == "Q" else None,
            )
        else:
            y = tk.w4a8_gemm(xt, pm, pack, cfg, a_float=True, out_dtype=torch.float32, epilogue=False)
        got = (y.double() * 16).round().long()
        assert torch.isfinite(y).all(), cfg.tag()
        assert torch.equal(got, expect), f"{cfg.tag()}: max diff {(got - expect).abs().max()}"


@pytest.mark.parametrize("m", (1, 50, 800))
@pytest.mark.parametrize("preset", ["A", "B"])
@pytest.mark.parametrize("k", (1024, 2048, 4096))
def test_act_quant_codes_and_scales(tk, k, preset, m):
    lay = synth_layer(k, 256, preset)
    x = (torch.randn(m, k, device="cuda") * (1 + 5 * torch.rand(k, device="cuda"))).to(torch.bfloat16)
    codes, scale = ref.act_quant_ref(x, lay.w4a8.perm, lay.w4a8.r_in, 127)
    q, s = tk.act_quant(x, lay.w4a8)
    assert torch.allclose(s, scale, rtol=1e-5, atol=0)
    diff = (q.int() - codes.int()).abs()
    assert diff.max() <= 1, "codes differ by more than a rounding step"
    assert (diff == 0).float().mean() > 0.999
    q2, s2 = tk.act_quant_chunked(x, lay.w4a8)
    assert q2.shape == (1, m, k) and s2.shape == (1, m)
    assert torch.allclose(s2[0], scale, rtol=1e-5, atol=0)
    d2 = (q2[0].int() - codes.int()).abs()
    assert d2.max() <= 1 and (d2 == 0).float().mean() > 0.999
    xt, pm = tk.act_chunks(x, lay.w4a8.perm, lay.w4a8.r_in, lay.w4a8.block, mode=0)
    assert _rel(xt[0], ref.transform_ref(x, lay.w4a8.perm, lay.w4a8.r_in)) < 1e-5
    assert torch.allclose(pm[0].amax(1) / 127, scale, rtol=1e-5)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("preset", ["A", "B"])
def test_w4a8_linear_matches_reference(tk, preset, k, n, m):
    lay = synth_layer(k, n, preset)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[:, torch.randint(0, k, (4,))] *= 20  # outlier channels
    expect = ref.w4a8_linear_ref(x, lay.w4a8)
    y = tk.w4a8_linear(x, lay.w4a8)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert _rel(y, expect) <= 1e-2
    pick = tk.pick_config(m, n, k)
    variants = [
        dataclasses.replace(pick, path="L", swap=False, bn=64),
        tk.GemmConfig(path="S", bm=64, bn=64, split_k=2, warps=4, stages=3, swap=not pick.swap),
        tk.GemmConfig(path="Q", bm=64, bn=128, split_k=1, warps=4, stages=3),
        tk.small_config(m, n, k, bt=16 if m <= 16 else 64, codes=True) if m <= 64 else None,
    ]
    variants = [c for c in variants if c is not None]
    variants = [c for c in variants if c != pick]
    for cfg in variants:  # the other GEMM orientation and the two-pass activation kernel, whatever was picked
        assert _rel(tk.w4a8_linear(x, lay.w4a8, cfg), expect) <= 1e-2, cfg.tag()


@pytest.mark.parametrize("m", (16, 300))
def test_restore_unfused_when_block_out_exceeds_tile(tk, m):
    """block_out 128 > BN 64: the restore runs as a separate step, same result."""
    g = torch.Generator(device="cuda").manual_seed(3)
    from pytest_duquant.kernels.bench import random_orthogonal_blocks

    k, n = 1024, 512
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device="cuda")
    pack = make_w4a8_pack(
        perm=torch.randperm(k, device="cuda"),
        r_in=random_orthogonal_blocks(k // 32, 32, "cuda", g).bfloat16(),
        w_codes=w,
        w_scales=torch.rand(n, device="cuda") * 0.01,
        bias=torch.randn(n, device="cuda"),
        r_out=random_orthogonal_blocks(n // 128, 128, "cuda", g),
        row_rot="restore",
    )
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    expect = ref.w4a8_linear_ref(x, pack)
    for swap in (False, True):
        cfg = tk.GemmConfig(
            path="S", bm=16 if m <= 64 else 64, bn=64, split_k=2, warps=4, stages=3, swap=swap
        )
        assert _rel(tk.w4a8_linear(x, pack, cfg), expect) <= 1e-2, cfg.tag()


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("preset", ["A", "B"])
def test_simulated_linear_matches_reference(tk, preset, k, n, m):
    lay = synth_layer(k, n, preset)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq = tk.sim_act(x, lay.sim)
    xq_ref = ref.fakequant_act_ref(x, lay.sim.perm, lay.sim.r_in, lay.sim.act_scale, lay.sim.qmax_a)
    assert _rel(xq, xq_ref) <= 1e-2
    y = tk.simulated_linear(x, lay.sim)
    assert _rel(y, ref.simulated_linear_ref(x, lay.sim)) <= 1e-2


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("row_rot", ["restore", "propagate", "0"])
def test_duquant_layer_dispatch(tk, dynamic, row_rot):
    """DuQuantLinear(backend=triton) on CUDA runs the kernels and agrees with its reference forward."""
    from pytest_duquant.kernels.dispatch import can_use_triton
    from pytest_duquant.layer import DuQuantLinear
    from pytest_duquant.packs import build_pack

    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 512).cuda().to(torch.bfloat16)
    pack = build_pack(
        lin.weight.float(), wbits=4, block=16, block_out=16, ls=0.15, permute=True, row_rot=row_rot
    )
    layer = DuQuantLinear.from_pack(
        lin,
        pack,
        name="t",
        wbits=4,
        abits=8,
        block=16,
        block_out=16,
        row_rot=row_rot,
        act_pct=99.9,
        calib_steps=1,
        act_dynamic=dynamic,
    )
    x = torch.randn(2, 25, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_ref = layer(x)  # reference backend (also freezes the static scale)
        layer.backend = "triton"
        ok, why = can_use_triton(layer, x)
        assert ok, why
        y = layer(x)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert _rel(y, y_ref) <= 2e-2
    assert "triton" in layer.kernel_cache


SMALL_MS = tuple(m for m in MS if m <= 64)
GROUPS = {"qkv": (1024, (2048, 256, 256)), "gate_up": (1024, (4096, 4096)), "o": (2048, (1024,))}


def _small_cfgs(tk, m, n, k):
    """The picked small-M config, both activation hand-offs, and every token tile width that holds M."""
    out = [tk.small_config(m, n, k)]
    for bt in (16, 32, 64):
        for codes in (False, True):
            cfg = tk.small_config(m, n, k, bt=bt, codes=codes)
            if cfg not in out:
                out.append(cfg)
    return out


@pytest.mark.parametrize("m", SMALL_MS)
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("preset", ["A", "B"])
def test_group_matches_members_and_reference(tk, preset, group, m):
    """A W4A8Group (one activation + one GEMM launch for every member) equals the float reference of each
    member on the same input, for both activation hand-offs and every token tile; each member's column block
    equals that member run alone."""
    k, widths = GROUPS[group]
    layers = [synth_layer(k, n, preset) for n in widths]
    grp = make_w4a8_group([lay.w4a8 for lay in layers])
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[:, torch.randint(0, k, (4,))] *= 20
    expect = ref.w4a8_group_ref(x, grp)
    for cfg in _small_cfgs(tk, m, grp.out_features, k):
        y = tk.w4a8_small(x, grp, cfg)
        assert y.shape == (m, grp.out_features) and y.dtype == torch.bfloat16
        assert _rel(y, expect) <= 1e-2, cfg.tag()
    y = tk.w4a8_small(x, grp)
    for member, part in zip(grp.packs, grp.split(y), strict=True):
        assert _rel(part, tk.w4a8_linear(x, member).float()) <= 1e-2


@pytest.mark.parametrize("m", (80, 160, 256))
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_large_m_group_matches_the_reference(tk, group, m):
    """Groups above SMALL_M tokens (the expert at batch 8, 16 and 25: `grouping.GROUP_MAX_M`): the swap-AB
    kernel over 3 to 8 token tiles equals the float reference of each member."""
    k, widths = GROUPS[group]
    layers = [synth_layer(k, n, "B") for n in widths]
    grp = make_w4a8_group([lay.w4a8 for lay in layers])
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    x[:, torch.randint(0, k, (4,))] *= 20
    expect = ref.w4a8_group_ref(x, grp)
    y = tk.w4a8_small(x, grp)
    assert y.shape == (m, grp.out_features) and _rel(y, expect) <= 1e-2
    for member, part, lay in zip(grp.packs, grp.split(y), layers, strict=True):
        assert _rel(part, ref.w4a8_linear_ref(x, lay.w4a8)) <= 1e-2 and member is not None


@pytest.mark.parametrize("m", SMALL_MS)
@pytest.mark.parametrize("preset", ["A", "B"])
def test_geglu_prologue_matches_eager(tk, preset, m):
    """down(gelu_tanh(gate) * up) with the GeGLU computed inside the down projection's activation kernel (both
    hand-offs) equals the reference on the eager bf16 GeGLU."""
    lay = synth_layer(4096, 1024, preset)
    gu = torch.randn(m, 8192, device="cuda", dtype=torch.bfloat16) * 2
    expect = ref.w4a8_linear_ref(ref.geglu_ref(gu, 4096), lay.w4a8)
    for codes in (False, True):
        y = tk.w4a8_small(gu, lay.w4a8, tk.small_config(m, 1024, 4096, codes=codes), geglu=True)
        assert y.shape == (m, 1024)
        assert _rel(y, expect) <= 1e-2
    with pytest.raises(ValueError, match="does not fit"):
        tk.w4a8_small(gu[:, :4096], lay.w4a8, geglu=True)


@pytest.mark.parametrize("preset", ["A", "B"])
@pytest.mark.parametrize("tokens", (10, 80))
def test_geglu_model_path_matches_the_unfused_mlp(tk, preset, tokens, tmp_path, monkeypatch):
    """The pi0.5 MLP quantized with the triton backend: with GEGLU_PROLOGUE (and groups up to 256 tokens) its
    forward runs gate/up as one group and the GeGLU inside down's activation kernel; the result equals the
    unfused layers' within the quantization noise (the prologue keeps the GeGLU product in fp32, the unfused
    path rounds it to bf16), and the fused path really ran."""
    from pytest_duquant.config import from_env, replace
    from pytest_duquant.kernels import grouping
    from pytest_duquant.policies.pi05.configuration import GemmaSpec
    from pytest_duquant.policies.pi05.modeling import GemmaMLP
    from pytest_duquant.quantize import quantize_model

    torch.manual_seed(0)
    spec = GemmaSpec(width=1024, depth=1, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
    mlp = GemmaMLP(spec).cuda().to(torch.bfloat16)
    x = torch.randn(tokens // 10, 10, 1024, device="cuda", dtype=torch.bfloat16)
    fp = mlp(x)
    quantize_model(mlp, replace(from_env({}, preset=preset), scope="", backend="triton", act_dynamic=True,
                                packdir=str(tmp_path)))
    monkeypatch.setattr(grouping, "GEGLU_PROLOGUE", False)
    unfused = mlp(x)
    calls = []
    real = tk.w4a8_small
    monkeypatch.setattr(tk, "w4a8_small", lambda *a, **kw: calls.append(kw.get("geglu", False)) or real(*a, **kw))
    monkeypatch.setattr(grouping, "GEGLU_PROLOGUE", True)
    monkeypatch.setattr(grouping, "GROUP_MAX_M", 256)
    fused = mlp(x)
    assert calls == [False, True], calls  # the gate/up group, then down with the GeGLU prologue
    assert fused.shape == unfused.shape
    _same_within_quantization_noise(fused, unfused, fp)


def test_expert_stack_modes_agree(tk):
    """The whole expert (4 layers, 2 denoising steps, 50 tokens) one layer at a time, grouped, grouped with the
    GeGLU prologue, and grouped on int8 codes (same weights: same seeds): the modes differ only by rounding
    (dynamic per-token codes flip near .5 and the flips propagate), far less than W4A8 differs from bf16;
    a wrong member, tile or GeGLU would differ as much as the quantization error or more."""
    from pytest_duquant.kernels.bench import ExpertStack

    x = torch.randn(50, 1024, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for mode in ("bf16", "w4a8", "w4a8-grouped", "w4a8-grouped-geglu", "w4a8-grouped-codes"):
        torch.manual_seed(0)  # the synthetic layers' permutations come from the global generator
        with torch.no_grad():
            outs[mode] = ExpertStack(mode, "A", depth=4).denoise(x, steps=2).float()
        assert torch.isfinite(outs[mode]).all(), mode
    quant_err = _rel(outs["w4a8"], outs["bf16"])
    assert 0.01 < quant_err < 0.5, "W4A8 vs bf16 should differ by a quantization error"
    for mode in ("w4a8-grouped", "w4a8-grouped-geglu", "w4a8-grouped-codes"):
        assert _rel(outs[mode], outs["w4a8"]) <= 0.35 * quant_err, mode


def test_duquant_sibling_group_runs_members_together(tk, tmp_path):
    """quantize_model(backend=triton) groups q/k/v: the first member's call computes all three (the others are
    served from the group for the same input tensor), with the same result as each layer alone."""
    from pytest_duquant.config import DuQuantConfig, replace
    from pytest_duquant.quantize import quantize_model

    torch.manual_seed(0)
    attn = torch.nn.Module()
    attn.q_proj = torch.nn.Linear(1024, 2048, bias=False)
    attn.k_proj = torch.nn.Linear(1024, 256, bias=False)
    attn.v_proj = torch.nn.Linear(1024, 256, bias=False)
    cfg = replace(DuQuantConfig(), scope="", backend="triton", act_dynamic=True, packdir=str(tmp_path))
    quantize_model(attn, cfg)
    attn.cuda()
    group = attn.q_proj.kernel_group
    assert group is not None and group is attn.v_proj.kernel_group
    x = torch.randn(2, 25, 1024, device="cuda")
    with torch.no_grad():
        q = attn.q_proj(x)
        assert set(group._pending) == {attn.k_proj, attn.v_proj}, "one call must compute every member"
        k, v = attn.k_proj(x), attn.v_proj(x)
        assert not group._pending
        for layer in (attn.q_proj, attn.k_proj, attn.v_proj):
            layer.kernel_group = None
        alone = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    for got, want in zip((q, k, v), alone, strict=True):
        assert got.shape == want.shape and _rel(got, want) <= 1e-2


@pytest.mark.parametrize("preset", ["A", "B"])
def test_custom_ops_on_gpu_match_the_kernels_and_compile_without_a_graph_break(tk, preset, tmp_path, monkeypatch):
    """kernels.ops on CUDA (the Triton launchers behind duquant::w4a8_linear / simulated_linear / w4a8_group):
    opcheck, equal to the launchers called directly (same kernels: bitwise), and an attention + MLP block of
    quantized layers compiled by inductor with fullgraph (no graph break) agrees with the eager kernels."""
    from torch._dynamo.utils import counters

    from pytest_duquant.config import from_env, replace
    from pytest_duquant.kernels import ops
    from pytest_duquant.policies.pi05.configuration import GemmaSpec
    from pytest_duquant.policies.pi05.modeling import GemmaMLP
    from pytest_duquant.quantize import quantize_model

    lay = synth_layer(1024, 2048, preset)
    x = torch.randn(2, 25, 1024, device="cuda", dtype=torch.bfloat16)
    w4, sim = lay.w4a8, lay.sim
    args_w4 = (w4.perm, w4.r_in, w4.w_packed, w4.w_scales, w4.bias, w4.r_out, w4.abits)
    args_sim = (sim.perm, sim.r_in, sim.act_scale, sim.weight, sim.bias, sim.abits)
    for op, args in ((torch.ops.duquant.w4a8_linear.default, args_w4),
                     (torch.ops.duquant.simulated_linear.default, args_sim)):
        torch.library.opcheck(op, (x, *args), test_utils=("test_schema", "test_faketensor"))
    assert torch.equal(ops.call_pack(x, w4), tk.w4a8_linear(x, w4))
    assert torch.equal(ops.call_pack(x, sim), tk.simulated_linear(x, sim))
    grp = make_w4a8_group([synth_layer(1024, n, preset).w4a8 for n in (2048, 256, 256)])
    assert torch.equal(ops.call_pack(x[0], grp), tk.w4a8_small(x[0], grp))

    torch.manual_seed(0)
    spec = GemmaSpec(width=1024, depth=1, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)
    mlp = GemmaMLP(spec).cuda().to(torch.bfloat16)
    xm = torch.randn(1, 10, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fp = mlp(xm)
    quantize_model(mlp, replace(from_env({}, preset=preset), scope="", backend="triton", act_dynamic=True,
                                packdir=str(tmp_path)))
    with torch.no_grad():
        eager = mlp(xm)
        assert ops.prepare_for_compile(mlp, torch.bfloat16) == 3
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(mlp, fullgraph=True, dynamic=False)(xm)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert compiled.shape == eager.shape
    _same_within_quantization_noise(compiled, eager, fp)
