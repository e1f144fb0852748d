"""The gather-only dispatch/combine of MoE rows equals plain indexing, forward and backward."""

from __future__ import annotations

import torch

from kha_train.model.moe.dispatch import combine_rows, dispatch_rows, inverse_permutation


def test_inverse_permutation() -> None:
    order = torch.randperm(37)
    inv = inverse_permutation(order)
    assert torch.equal(inv[order], torch.arange(37))
    assert torch.equal(order[inv], torch.arange(37))


def test_dispatch_and_combine_match_indexing_with_gradients() -> None:
    torch.manual_seed(0)
    N, K, D, E = 11, 3, 5, 4
    expert_ids = torch.randint(0, E, (N * K,))
    order = torch.argsort(expert_ids, stable=True)
    inv = inverse_permutation(order)
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N * K, D, dtype=torch.float64)  # stands in for the experts' work

    def ours(x: torch.Tensor) -> torch.Tensor:
        return combine_rows(dispatch_rows(x, order, inv, K) * w, order, inv)

    def reference(x: torch.Tensor) -> torch.Tensor:
        y_sorted = x[order // K] * w
        return torch.zeros_like(y_sorted).index_copy(0, order, y_sorted)

    assert torch.equal(ours(x), reference(x))
    g = torch.randn(N * K, D, dtype=torch.float64)
    (gx,) = torch.autograd.grad(ours(x), x, g)
    (gx_ref,) = torch.autograd.grad(reference(x), x, g)
    torch.testing.assert_close(gx, gx_ref)
    assert torch.autograd.gradcheck(ours, (x,))
