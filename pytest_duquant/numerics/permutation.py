"""Channel energy and the zigzag permutation (docs/contract.md, "Algorithm" steps 1-2)."""

from __future__ import annotations

import torch


def channel_energy(weight: torch.Tensor) -> torch.Tensor:
    """e_j = mean_i W_ij^2 over output rows, per input channel j (float64)."""
    w = weight.detach().to(torch.float64)
    return (w * w).mean(dim=0)


def smooth_energy(energy: torch.Tensor, ls: float) -> torch.Tensor:
    """Pull energies toward their mean: e <- (1 - LS) e + LS mean(e)."""
    if ls <= 0:
        return energy
    return (1.0 - ls) * energy + ls * energy.mean()


def zigzag_permutation(energy: torch.Tensor) -> torch.Tensor:
    """Sort channels by energy (descending), then take alternately from the front and the back.

    Returns `perm` such that the permuted tensor is `x[..., perm]`. Ties keep index order (stable sort).
    """
    n = energy.numel()
    order = torch.sort(energy, descending=True, stable=True).indices
    front = order[: (n + 1) // 2]
    back = order.flip(0)[: n // 2]
    perm = torch.empty(n, dtype=torch.long)
    perm[0::2] = front
    perm[1::2] = back
    return perm


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inv
