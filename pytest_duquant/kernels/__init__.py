"""GPU kernels for DuQuant (Triton), each checked against a torch twin in `reference.py`.

Importing this package never imports triton: `triton_kernels` is imported only by `dispatch.w4a8_forward`
and by GPU tests/benchmarks. CPU-only pieces: `packing` (int4 layout), `packs` (kernel-ready tensors),
`reference` (the math the kernels must reproduce).
"""

from pytest_duquant.kernels.dispatch import can_use_triton, w4a8_forward
from pytest_duquant.kernels.packing import PACK_GROUP, pack_int4, unpack_int4

__all__ = ["PACK_GROUP", "can_use_triton", "pack_int4", "unpack_int4", "w4a8_forward"]
