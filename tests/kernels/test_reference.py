"""The kernels' torch twins compute the layer's math (CPU, runs in CI)."""

import pytest
import torch

from pytest_duquant.kernels import reference as ref
from pytest_duquant.kernels.packing import unpack_int4
from pytest_duquant.kernels.packs import fold_restore, make_sim_pack, make_w4a8_pack, rotation_supported


def _rand_orth(nb, b, g):
    q, r = torch.linalg.qr(torch.randn(nb, b, b, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]).float()


def _case(k=256, n=128, block=16, bo=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=g)
    r_in = _rand_orth(k // block, block, g)
    r_out = _rand_orth(n // bo, bo, g)
    codes = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    x = torch.randn(5, 3, k, generator=g)
    return g, perm, r_in, r_out, codes, scales, bias, x


def test_transform_matches_dense_matrix():
    g, perm, r_in, _, _, _, _, x = _case()
    dense = torch.block_diag(*r_in.unbind(0))
    expect = x[..., perm] @ dense
    assert torch.allclose(ref.transform_ref(x, perm, r_in), expect, atol=1e-5)


def test_act_quant_matches_numerics_quantize_per_token():
    from pytest_duquant.numerics.quantizers import quantize_per_token

    g, perm, r_in, _, _, _, _, x = _case()
    x2 = x.reshape(-1, x.shape[-1])
    codes, scale = ref.act_quant_ref(x2, perm, r_in, 127)
    c2, s2 = quantize_per_token(ref.transform_ref(x2, perm, r_in), 8)
    assert torch.equal(codes.float(), c2) and torch.allclose(scale, s2[:, 0])
    assert codes.abs().max() == 127  # the token max maps to qmax


def test_int_acc_is_exact():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (7, 4096), generator=g, dtype=torch.int8)
    w = torch.randint(-8, 8, (5, 4096), generator=g, dtype=torch.int8)
    expect = (a.long()[:, None, :] * w.long()[None, :, :]).sum(-1)
    assert torch.equal(ref.int_acc_ref(a, w), expect)


@pytest.mark.parametrize("row_rot", ["restore", "0"])
def test_w4a8_ref_equals_dequantized_float_math(row_rot):
    g, perm, r_in, r_out, codes, scales, bias, x = _case()
    pack = make_w4a8_pack(
        perm=perm,
        r_in=r_in,
        w_codes=codes,
        w_scales=scales,
        bias=bias,
        r_out=r_out,
        row_rot=row_rot,
        abits=8,
        rot_dtype=torch.float32,
    )
    assert torch.equal(unpack_int4(pack.w_packed), codes)
    y = ref.w4a8_linear_ref(x, pack)
    # the same math written with dequantized tensors and dense matrices
    x2 = x.reshape(-1, 256).double()
    xt = x2[:, perm] @ torch.block_diag(*r_in.double().unbind(0))
    s = xt.abs().amax(1, keepdim=True) / 127
    xq = torch.round(xt / s).clamp(-128, 127) * s
    yt = xq @ (codes.double() * scales.double()[:, None]).T
    if row_rot == "restore":
        yt = yt @ torch.block_diag(*r_out.double().unbind(0))
    expect = (yt + bias.double()).reshape(5, 3, -1)
    assert (y - expect).norm() / expect.norm() < 1e-5


def test_fold_restore_equals_restoring_the_output():
    g, perm, r_in, r_out, codes, scales, bias, x = _case()
    wq = codes.double() * scales.double()[:, None]
    x2 = torch.randn(4, 256, generator=g, dtype=torch.float64)
    expect = (x2 @ wq.T) @ torch.block_diag(*r_out.double().unbind(0))
    got = x2 @ fold_restore(wq, r_out).T
    assert torch.allclose(got, expect, atol=1e-10)


def test_simulated_ref_matches_layer_reference_forward():
    """simulated_linear_ref on the layer's own buffers = DuQuantLinear's reference forward (float32)."""
    torch.manual_seed(0)
    from pytest_duquant.layer import DuQuantLinear
    from pytest_duquant.packs import build_pack

    lin = torch.nn.Linear(256, 128)
    pack = build_pack(lin.weight, wbits=4, block=16, block_out=16, ls=0.15, permute=True, row_rot="restore")
    layer = DuQuantLinear.from_pack(
        lin,
        pack,
        name="t",
        wbits=4,
        abits=8,
        block=16,
        block_out=16,
        row_rot="restore",
        act_pct=99.9,
        calib_steps=1,
    )
    x = torch.randn(6, 256)
    with torch.no_grad():
        layer(x)  # calibrates and freezes the static scale
        y_layer = layer(x)
    sp = make_sim_pack(
        perm=layer.perm,
        r_in=layer.r_in,
        weight_q=layer.weight_q,
        act_scale=layer.act_scale,
        bias=layer.bias.detach(),
        r_out=layer.r_out,
        row_rot="restore",
        abits=8,
        dtype=torch.float32,
        rot_dtype=torch.float32,
    )
    y_ref = ref.simulated_linear_ref(x, sp)
    assert (y_ref.float() - y_layer).norm() / y_layer.norm() < 1e-4


def test_w4a8_ref_matches_layer_dynamic_forward():
    torch.manual_seed(1)
    from pytest_duquant.layer import DuQuantLinear
    from pytest_duquant.packs import build_pack

    lin = torch.nn.Linear(256, 128)
    pack = build_pack(lin.weight, wbits=4, block=16, block_out=16, ls=0.15, permute=True, row_rot="restore")
    layer = DuQuantLinear.from_pack(
        lin,
        pack,
        name="t",
        wbits=4,
        abits=8,
        block=16,
        block_out=16,
        row_rot="restore",
        act_pct=99.9,
        calib_steps=1,
        act_dynamic=True,
    )
    x = torch.randn(6, 256)
    with torch.no_grad():
        y_layer = layer(x)
    wp = make_w4a8_pack(
        perm=layer.perm,
        r_in=layer.r_in,
        w_codes=layer.w_codes,
        w_scales=layer.w_scales,
        bias=layer.bias.detach(),
        r_out=layer.r_out,
        row_rot="restore",
        abits=8,
        rot_dtype=torch.float32,
    )
    y_ref = ref.w4a8_linear_ref(x, wp)
    assert (y_ref.float() - y_layer).norm() / y_layer.norm() < 1e-4


@pytest.mark.parametrize(
    "k,block,ok",
    [
        (1024, 16, True),
        (1024, 64, True),
        (1024, 128, True),
        (1024, 8, False),
        (1024, 48, False),
        (1000, 8, False),
        (256, 256, True),
    ],
)
def test_rotation_supported(k, block, ok):
    assert rotation_supported(k, block)[0] is ok


def test_dispatch_refuses_cpu_input_without_importing_triton():
    import sys

    from pytest_duquant.kernels.dispatch import can_use_triton

    class L:
        in_features = 128

    ok, why = can_use_triton(L(), torch.zeros(2, 128))
    assert not ok and "CUDA" in why
    assert "pytest_duquant.kernels.triton_kernels" not in sys.modules
