"""Moving token rows to expert order and back, as gathers in both directions.

With N tokens, K slots per token and the (token, slot) assignments sorted by expert
(``order``: sorted position -> slot index t*K + k; ``inverse``: its inverse permutation):

    dispatch:  x_sorted[i] = x[order[i] // K]         (each token row appears K times)
    combine:   y_slots[j]  = y_sorted[inverse[j]]     (back to (token, slot) order)

PyTorch's own backward of such an index_select is an atomic scatter-add (index_add). Since both
maps are permutations (up to the K copies), each backward is a plain gather with the other
permutation, plus, for dispatch, a sum over each token's K rows: no atomics, deterministic, and
faster on GPUs.
"""

from __future__ import annotations

import torch


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, inverse, k):  # type: ignore[override]
        # x [R, D], src [R*k] rows of x (each row of x exactly k times), inverse: src's
        # positions in slot order, so that src[inverse[r*k + j]] == r for j < k.
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, src)  # (R*k, D)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)  # (R*k, D) in slot order
        if ctx.k > 1:
            g = g.view(-1, ctx.k, g.shape[-1]).sum(dim=1)  # (R, D): the k copies' gradients
        return g, None, None, None


def dispatch_rows(
    x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int
) -> torch.Tensor:
    """x [N, D] -> rows in expert order [N*k, D]: row i is token ``order[i] // k``."""
    return _GatherRows.apply(x, order // k, inverse, k)


def combine_rows(
    y_sorted: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor
) -> torch.Tensor:
    """Rows in expert order [N*k, D] -> (token, slot) order [N*k, D]."""
    return _GatherRows.apply(y_sorted, inverse, order, 1)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[i]] = i, computed with a scatter (no sort, no host sync)."""
    inv = torch.empty_like(order)
    inv.scatter_(0, order, torch.arange(order.numel(), device=order.device, dtype=order.dtype))
    return inv
