"""The W4A8 kernels as torch.library custom ops (kernels.ops), on CPU: there the ops run the kernels' torch twins,
so the op plumbing (schemas, fake implementations, the model's op path under torch.compile) is tested here; the
CUDA implementations (Triton launchers) run only on a GPU (scripts/gpu_speed_job.py --compile-quantized)."""

import copy

import pytest
import torch

from pytest_duquant.config import DuQuantConfig, replace
from pytest_duquant.kernels import ops
from pytest_duquant.kernels import reference as ref
from pytest_duquant.kernels.dispatch import get_pack
from pytest_duquant.kernels.packs import SimPack, W4A8Group, W4A8Pack, make_w4a8_group
from pytest_duquant.layer import DuQuantLinear
from pytest_duquant.quantize import quantize_model

K, WIDTHS = 256, {"q_proj": 256, "k_proj": 64, "v_proj": 64, "o_proj": 256}


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


class _Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name, n in WIDTHS.items():
            setattr(self, name, torch.nn.Linear(K if name != "o_proj" else 256, n, bias=True))


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(K, 512, bias=False)
        self.up_proj = torch.nn.Linear(K, 512, bias=False)
        self.down_proj = torch.nn.Linear(512, K, bias=False)


class _Block(torch.nn.Module):
    """q/k/v and gate/up through `sibling_outputs` (as pi0.5's run_layers and GemmaMLP do)."""

    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = _Attn(), _Mlp()

    def forward(self, x):
        a = self.self_attn
        q, k, v = ops.sibling_outputs((a.q_proj, a.k_proj, a.v_proj), x)
        h = x + a.o_proj(q * torch.sigmoid(torch.cat([k, v, k, v], dim=-1)))
        gate, up = ops.sibling_outputs((self.mlp.gate_proj, self.mlp.up_proj), h)
        return h + self.mlp.down_proj(torch.nn.functional.gelu(gate, approximate="tanh") * up)


def _model(tmp_path, *, dynamic=True, row_rot="restore", seed=0, float_copy=None):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(_Block(), _Block())
    if float_copy is not None:
        float_copy.append(copy.deepcopy(model))
    config = replace(DuQuantConfig(), scope="", backend="triton", act_dynamic=dynamic, block=16, row_rot=row_rot,
                     calib_steps=1, packdir=str(tmp_path / f"packs-{dynamic}-{row_rot}"))
    quantize_model(model, config)
    if not dynamic:
        with torch.no_grad():
            model(torch.randn(4, 3, K) * 2)  # calibrates and freezes every static scale (calib_steps=1)
    return model


def _x(m=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m // 2, K, generator=g)
    x[..., 7] *= 20  # an outlier channel
    return x


@pytest.fixture
def force_ops(monkeypatch):
    monkeypatch.setattr(ops, "FORCE_OPS", True)


def _args(pack):
    if isinstance(pack, W4A8Group):
        return (torch.ops.duquant.w4a8_group.default, (pack.perm, pack.r_in, pack.w_packed, pack.w_scales,
                pack.bias, pack.r_out, pack.tile_member, pack.abits, list(pack.widths)))
    if isinstance(pack, W4A8Pack):
        return (torch.ops.duquant.w4a8_linear.default,
                (pack.perm, pack.r_in, pack.w_packed, pack.w_scales, pack.bias, pack.r_out, pack.abits))
    return (torch.ops.duquant.simulated_linear.default,
            (pack.perm, pack.r_in, pack.act_scale, pack.weight, pack.bias, pack.abits))


# ---- the ops themselves -------------------------------------------------------------------------------------
@pytest.mark.parametrize("row_rot", ["restore", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op_on_packs_of_quantized_layers(tmp_path, row_rot, dtype):
    """torch.library.opcheck (schema, fake tensor, autograd registration, AOT dispatch) on realistic packs: a
    q_proj's W4A8Pack (permuted, restore rotation, bias), a static-scale layer's SimPack, the q/k/v group."""
    dyn, static = _model(tmp_path, row_rot=row_rot), _model(tmp_path, dynamic=False, row_rot=row_rot)
    attn = dyn[0].self_attn
    w4 = get_pack(attn.q_proj, dtype)
    sim = get_pack(static[0].self_attn.o_proj, dtype)
    grp = make_w4a8_group([get_pack(m, dtype) for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    assert isinstance(w4, W4A8Pack) and isinstance(sim, SimPack) and sim.act_scale is not None
    assert (w4.perm is not None) and (w4.r_out is not None) == (row_rot == "restore") and w4.bias is not None
    for pack in (w4, sim, grp):
        op, args = _args(pack)
        for x in (_x().to(dtype), _x(m=2)[0].to(dtype)):  # [2, 3, K] and [1, K]
            torch.library.opcheck(op, (x, *args))
            y = op(x, *args)
            assert y.shape == (*x.shape[:-1], pack.out_features) and y.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_equal_their_reference_twins_and_the_layers(tmp_path, dtype):
    """On CPU each op is its torch twin cast to x.dtype (bitwise), and agrees with the layer's own (non-op)
    forward to the kernels-vs-layer tolerance of the GPU tests (2e-2), far inside the quantization error."""
    x = _x().to(dtype)
    for dynamic in (True, False):
        fp = []
        model = _model(tmp_path, dynamic=dynamic, float_copy=fp).to(dtype)
        fp[0].to(dtype)
        for name in ("q_proj", "k_proj", "o_proj"):
            layer = getattr(model[1].self_attn, name)
            pack = get_pack(layer, dtype)
            op, args = _args(pack)
            y = op(x, *args)
            twin = ref.w4a8_linear_ref if dynamic else ref.simulated_linear_ref
            assert torch.equal(y, twin(x, pack).to(dtype))
            with torch.no_grad():
                y_layer = layer(x)  # FORCE_OPS off: the layer's reference forward on CPU
                y_float = getattr(fp[0][1].self_attn, name)(x)
            err = _rel(y, y_layer)
            assert err <= 2e-2, (dynamic, name, err)
            assert err < 0.25 * _rel(y_layer, y_float), (dynamic, name)  # well inside the quantization error
    model = _model(tmp_path)
    grp_layers = (model[0].mlp.gate_proj, model[0].mlp.up_proj)
    grp = make_w4a8_group([get_pack(m, dtype) for m in grp_layers])
    op, args = _args(grp)
    y = op(x, *args)
    assert torch.equal(y, ref.w4a8_group_ref(x, grp).to(dtype))
    for part, member in zip(grp.split(y), grp.packs, strict=True):  # each member's columns = that member alone
        op1, args1 = _args(member)
        assert torch.equal(part, op1(x, *args1))


# ---- the model's op path --------------------------------------------------------------------------------------
def _op_counts(graphs) -> dict:
    counts: dict = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and "duquant" in str(node.target):
                name = str(node.target).split("duquant.")[1].split(".")[0]
                counts[name] = counts.get(name, 0) + 1
    return counts


def _recording_aot_eager(graphs):
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def test_default_cpu_behaviour_takes_no_op_path(tmp_path):
    """FORCE_OPS off: a triton-backend model on CPU runs the layers' reference forward (no pack is built), and
    prepare_for_compile builds nothing off CUDA."""
    model = _model(tmp_path)
    with torch.no_grad():
        model(_x())
    layers = [m for m in model.modules() if isinstance(m, DuQuantLinear)]
    assert len(layers) == 14 and all(not m.kernel_cache for m in layers)
    assert ops.prepare_for_compile(model, torch.float32) == 0 and all(not m.kernel_cache for m in layers)


@pytest.mark.parametrize("dynamic", [True, False], ids=["w4a8", "simulated"])
def test_compiled_model_traces_the_ops_without_a_graph_break(tmp_path, force_ops, dynamic):
    """A model of DuQuantLinear blocks on the op path (FORCE_OPS: CPU runs the twins) compiles with fullgraph (any
    graph break raises) into one graph whose quantized linears are the custom ops: integer path, q/k/v and
    gate/up one `w4a8_group` each, o/down a `w4a8_linear` each; static scales, a `simulated_linear` per layer.
    Compiled = eager op path (aot_eager replays the same ops), and the op path agrees with the layers' reference
    forward to kernel-vs-layer rounding."""
    from torch._dynamo.utils import counters

    model = _model(tmp_path, dynamic=dynamic)
    x = _x()
    with torch.no_grad():
        ops.FORCE_OPS = False
        reference = model(x)
        ops.FORCE_OPS = True
        assert ops.prepare_for_compile(model, torch.float32) == 14
        packs = {m: m.kernel_cache["triton"][1] for m in model.modules() if isinstance(m, DuQuantLinear)}
        eager = model(x)
        assert all(m.kernel_cache["triton"][1] is p for m, p in packs.items())  # the prepared packs were used
        torch._dynamo.reset()
        counters.clear()
        graphs = []
        compiled_model = torch.compile(model, backend=_recording_aot_eager(graphs), fullgraph=True, dynamic=False)
        compiled = compiled_model(x)
        again = compiled_model(x)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"] and len(graphs) == 1
    expect = {"w4a8_group": 4, "w4a8_linear": 4} if dynamic else {"simulated_linear": 14}
    assert _op_counts(graphs) == expect
    assert torch.equal(compiled, eager) and torch.equal(again, compiled)
    err = _rel(eager, reference)
    assert 0 < err <= 2e-2, err  # the ops' packs (bf16 rotations) vs the layers' own float32 forward


def test_group_op_equals_the_members_alone_on_the_op_path(tmp_path, force_ops):
    """sibling_outputs on the op path: one group op whose split equals each member's own op, bitwise (CPU);
    with more tokens than grouping.GROUP_MAX_M, or a member off the integer path, each member runs alone."""
    from pytest_duquant.kernels import grouping

    model = _model(tmp_path)
    attn = model[0].self_attn
    members = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = _x()
    calls = []
    real = ops.call_pack
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops, "call_pack", lambda x, p: calls.append(type(p).__name__) or real(x, p))
            grouped = ops.sibling_outputs(members, x)
            assert calls == ["W4A8Group"]
            alone = [m(x) for m in members]
            assert calls[1:] == ["W4A8Pack"] * 3
            calls.clear()
            mp.setattr(grouping, "GROUP_MAX_M", x.shape[:-1].numel() - 1)
            assert all(torch.equal(a, b) for a, b in zip(ops.sibling_outputs(members, x), alone, strict=True))
            assert calls == ["W4A8Pack"] * 3
    assert [g.shape[-1] for g in grouped] == [256, 64, 64]
    assert all(torch.equal(g, a) for g, a in zip(grouped, alone, strict=True))
    assert all(m.kernel_cache["triton"][1].w_packed.untyped_storage().data_ptr()
               == attn.q_proj.kernel_group._pack[1].w_packed.untyped_storage().data_ptr() for m in members)


def test_the_op_path_declines_inputs_that_need_a_gradient(tmp_path, force_ops):
    """The ops have no backward: an input that requires grad (grad mode on) runs the layer's reference forward."""
    model = _model(tmp_path)
    layer = model[0].self_attn.o_proj
    x = _x().requires_grad_()
    y = layer(x)
    y.sum().backward()
    assert x.grad is not None and not layer.kernel_cache
    ops.FORCE_OPS = False
    assert torch.equal(y, layer(x))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_quantized_pi05_step_compiles_as_one_graph_with_the_ops(tmp_path, force_ops, dynamic):
    """The dummy pi0.5 with its expert quantized (preset B, backend "triton", calibrated): `compile_fast_step`
    prepares the packs and the Euler step traces without a graph break, the expert's eligible linears (o_proj
    and down_proj: the dummy's width 64 is below the kernels' 128 granularity for the others, which keep the
    reference forward) as custom ops; the compiled actions equal the eager op path's."""
    from torch._dynamo.utils import counters

    from pytest_duquant.config import from_env
    from pytest_duquant.policies import build_policy, session, synthetic_observations
    from pytest_duquant.policies.pi05.modeling import compact_prefix

    obs = synthetic_observations(2, seed=21)
    policy = build_policy("dummy", seed=5)
    config = replace(from_env({}, preset="B"), packdir=str(tmp_path / "packs"), calib_steps=2, backend="triton",
                     act_dynamic=dynamic)
    ops.FORCE_OPS = False
    session.quantize_and_calibrate(policy, config, obs)
    m = policy.model
    small = compact_prefix(**policy.prepare(obs))
    noise = policy.noise([1, 2])
    with torch.no_grad():
        reference = m.sample_actions_fast(noise=noise, **small)
        ops.FORCE_OPS = True
        eager = m.sample_actions_fast(noise=noise, **small)
        torch._dynamo.reset()
        counters.clear()
        graphs = []
        try:
            m.compile_fast_step(backend=_recording_aot_eager(graphs), fullgraph=True)
            compiled = m.sample_actions_fast(noise=noise, **small)
            again = m.sample_actions_fast(noise=noise, **small)
        finally:
            m.compile_fast_step(False)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    depth = len(m.paligemma_with_expert.expert.layers)
    assert _op_counts(graphs) == {("w4a8_linear" if dynamic else "simulated_linear"): 2 * depth}
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert torch.equal(again, compiled)
    err = _rel(eager, reference)
    assert 0 < err <= 2e-2, err
