"""int4 packing layout (CPU, runs in CI)."""

import pytest
import torch

from pytest_duquant.kernels.packing import PACK_GROUP, pack_int4, unpack_int4


@pytest.mark.parametrize("shape", [(1, 128), (3, 256), (17, 1024)])
def test_round_trip_random(shape):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert torch.equal(unpack_int4(packed), codes)


def test_layout_is_half_split_per_group():
    codes = torch.zeros(1, PACK_GROUP, dtype=torch.int8)
    codes[0, 3] = -1  # low nibble of byte 3 -> 0xF
    codes[0, 64 + 3] = 5  # high nibble of byte 3 -> 0x5
    codes[0, 64] = -8  # high nibble of byte 0 -> 0x8
    p = pack_int4(codes)
    assert int(p[0, 3]) == 0x5F
    assert int(p[0, 0]) == 0x80
    assert int(p[0, 1]) == 0


def test_every_code_value_survives():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(16).reshape(2, 128)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (torch.zeros(2, 100, dtype=torch.int8), "multiple of 128"),
        (torch.full((2, 128), 8, dtype=torch.int8), r"\[-8, 7\]"),
        (torch.zeros(2, 128), "integer"),
        (torch.zeros(128, dtype=torch.int8), "2-D"),
    ],
)
def test_bad_input_is_a_clear_error(bad, msg):
    with pytest.raises(ValueError, match=msg):
        pack_int4(bad)
