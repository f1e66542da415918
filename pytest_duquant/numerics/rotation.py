"""Block-diagonal orthogonal rotations (docs/contract.md, "Algorithm" steps 3-4), stored as one batched tensor.

A `BlockRotation` over a width n with block b holds `blocks` [n // b, b, b] and, when b does not divide n,
one smaller `tail` block. Applying it is one batched einsum over all blocks, never a Python loop per block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockRotation:
    blocks: torch.Tensor  # [nb, b, b]
    tail: torch.Tensor | None = None  # [t, t] when the width is not a multiple of b

    @property
    def block(self) -> int:
        return int(self.blocks.shape[-1]) if self.blocks.numel() else int(self.tail.shape[-1])

    @property
    def width(self) -> int:
        full = int(self.blocks.shape[0] * self.blocks.shape[-1])
        return full + (int(self.tail.shape[0]) if self.tail is not None else 0)

    def to(self, *args, **kwargs) -> BlockRotation:
        tail = None if self.tail is None else self.tail.to(*args, **kwargs)
        return BlockRotation(self.blocks.to(*args, **kwargs), tail)

    def dense(self) -> torch.Tensor:
        """The full block-diagonal matrix (tests and small widths only)."""
        mats = list(self.blocks.unbind(0)) + ([self.tail] if self.tail is not None else [])
        return torch.block_diag(*mats)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R over the last dimension (row-vector convention; also rotates the columns of a weight)."""
        nb, b, _ = self.blocks.shape
        full = nb * b
        head = x[..., :full].reshape(*x.shape[:-1], nb, b)
        out = torch.einsum("...nb,nbc->...nc", head, self.blocks.to(x.dtype)).reshape(*x.shape[:-1], full)
        if self.tail is None:
            return out
        return torch.cat([out, x[..., full:] @ self.tail.to(x.dtype)], dim=-1)

    def apply_left(self, m: torch.Tensor) -> torch.Tensor:
        """R @ m over the first dimension (rotates the rows of a weight, or a bias vector)."""
        nb, b, _ = self.blocks.shape
        full = nb * b
        head = m[:full].reshape(nb, b, *m.shape[1:])
        out = torch.einsum("nij,nj...->ni...", self.blocks.to(m.dtype), head).reshape(full, *m.shape[1:])
        if self.tail is None:
            return out
        t = self.tail.to(m.dtype)
        rest = m[full:]
        tail_out = t @ rest if rest.dim() > 1 else t @ rest
        return torch.cat([out, tail_out], dim=0)


SIGN_TIE_RTOL = 1e-6
"""Entries whose |value| is within this relative distance of a column's largest |value| count as tied."""

SIGN_CONVENTION = "eigenvalue-desc;max-abs-positive;tie-lowest-row;rtol=1e-6"
"""The canonical form of a rotation basis, as stored in the pack cache key (docs/contract.md, "Conventions")."""


def canonical_signs(u: torch.Tensor) -> torch.Tensor:
    """Flip each column of u [..., r, c] so that its largest-|.| entry is positive.

    Entries within SIGN_TIE_RTOL of the column's largest |value| are tied; the tie goes to the lowest row
    index. An eigen solver may return either sign of an eigenvector (LAPACK builds differ, CPU and CUDA
    differ), and the sign is NOT harmless here: the int4 code range [-8, 7] is asymmetric, so W R and
    W (-R) quantize differently. One fixed sign makes the pack a function of the weight alone.
    """
    a = u.abs()
    top = a.amax(dim=-2, keepdim=True)
    near = (a >= top * (1.0 - SIGN_TIE_RTOL)).to(torch.uint8)
    row = near.argmax(dim=-2, keepdim=True)  # argmax returns the first maximal index (CPU and CUDA)
    lead = torch.gather(u, -2, row)
    sign = torch.where(lead < 0, -1.0, 1.0).to(u.dtype)
    return u * sign


def canonical_basis(eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> torch.Tensor:
    """Columns ordered by descending eigenvalue (stable: equal eigenvalues keep the solver's order), each
    with its canonical sign (`canonical_signs`). Whatever order and signs a solver returned, the same basis
    comes out (for distinct eigenvalues; an eigenspace of dimension > 1 has no unique basis to return)."""
    order = torch.argsort(eigenvalues, dim=-1, descending=True, stable=True)
    vecs = torch.gather(eigenvectors, -1, order.unsqueeze(-2).expand_as(eigenvectors))
    return canonical_signs(vecs)


def _left_singular_bases(mats: torch.Tensor) -> torch.Tensor:
    """U of each matrix in a batch [k, r, c] (always square [k, r, r]), in float64, in canonical form:
    columns by descending singular value, each column's largest-|.| entry positive (`canonical_basis`).

    Computed on the CPU as the eigenvectors of the r x r Gram matrix A A^T (eigh): the same left singular
    basis as an SVD, and 10-100x cheaper for the wide blocks of a weight (r = block, c = thousands), which
    an SVD would factor in full. On the CPU whatever device the weight is on, so a pack does not depend on
    the device's solver; the canonical form removes the remaining freedom (order and signs).
    """
    a = mats.to(device="cpu", dtype=torch.float64)
    gram = a @ a.transpose(-1, -2)
    with _one_thread():
        vals, vecs = torch.linalg.eigh(gram)
    return canonical_basis(vals, vecs)


@contextlib.contextmanager
def _one_thread():
    """LAPACK's eigh on a batch of small matrices gains nothing from threads, and on a busy machine a
    descheduled OpenMP thread stalls every call (measured: 1-6 s per call on 2 shared cores, vs 4 ms)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def input_rotation(weight: torch.Tensor, block: int) -> BlockRotation:
    """Per column block of `weight` [out, in]: U of W[:, block]^T (= U S V^T). Rotate with W @ R, x @ R."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    out_f, in_f = w.shape
    b = min(block, in_f)
    nb = in_f // b
    blocks = _left_singular_bases(w[:, : nb * b].reshape(out_f, nb, b).permute(1, 2, 0))
    tail = None
    if nb * b < in_f:
        tail = _left_singular_bases(w[:, nb * b :].T.unsqueeze(0))[0]
    return BlockRotation(blocks, tail)


def output_rotation(weight: torch.Tensor, block_out: int) -> BlockRotation:
    """Per row block of `weight` [out, in]: U of W[block, :] (= U S V^T). Rotate with R @ W; restore y @ R."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    out_f, in_f = w.shape
    b = min(block_out, out_f)
    nb = out_f // b
    blocks = _left_singular_bases(w[: nb * b].reshape(nb, b, in_f))
    tail = None
    if nb * b < out_f:
        tail = _left_singular_bases(w[nb * b :].unsqueeze(0))[0]
    return BlockRotation(blocks, tail)


def _spreading_matrix(b: int, dtype: torch.dtype) -> torch.Tensor:
    """Orthogonal b x b matrix whose first row is uniform (1/sqrt(b)): it spreads channel 0 over all b.

    A normalized Sylvester-Hadamard matrix when b is a power of two; otherwise the Q of a QR
    factorisation seeded with the all-ones vector (deterministic).
    """
    if b & (b - 1) == 0:
        h = torch.ones(1, 1, dtype=dtype)
        while h.shape[0] < b:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / b**0.5
    g = torch.Generator().manual_seed(b)
    a = torch.randn(b, b, generator=g, dtype=dtype)
    a[:, 0] = 1.0
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # first column = +1/sqrt(b)
    return q.T


def greedy_block_rotation(m: torch.Tensor, steps: int = 8, seed: int = 0) -> torch.Tensor:
    """The DuQuant paper's greedy outlier rotation for one block m [rows, b]: returns orthogonal R [b, b].

    Each step finds the column holding the largest |value| of m R, swaps it to position 0, spreads it over
    the block with a matrix whose first row is uniform, mixes the other b - 1 directions with a random
    orthogonal matrix, and keeps the step only if the largest |value| went down.
    """
    m = m.to(torch.float64)
    b = m.shape[1]
    g = torch.Generator().manual_seed(seed)
    r = torch.eye(b, dtype=torch.float64)
    spread = _spreading_matrix(b, torch.float64)
    best = m.abs().max()
    for step in range(steps):
        cur = m @ r
        d = int(cur.abs().amax(dim=0).argmax())
        swap = torch.eye(b, dtype=torch.float64)
        swap[[0, d]] = swap[[d, 0]]
        mix = torch.eye(b, dtype=torch.float64)
        if step > 0 and b > 2:
            q, _ = torch.linalg.qr(torch.randn(b - 1, b - 1, generator=g, dtype=torch.float64))
            mix[1:, 1:] = q
        cand = r @ swap @ spread.T @ mix
        value = (m @ cand).abs().max()
        if value >= best:
            break
        r, best = cand, value
    return r


def greedy_input_rotation(weight: torch.Tensor, block: int, steps: int = 8) -> BlockRotation:
    """Per column block of `weight` [out, in], the greedy outlier rotation (ROTATION=greedy)."""
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    in_f = w.shape[1]
    b = min(block, in_f)
    nb = in_f // b
    blocks = torch.stack([greedy_block_rotation(w[:, k * b:(k + 1) * b], steps, seed=k) for k in range(nb)])
    tail = greedy_block_rotation(w[:, nb * b:], steps, seed=nb) if nb * b < in_f else None
    return BlockRotation(blocks, tail)
