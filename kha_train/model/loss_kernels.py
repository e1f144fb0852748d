"""Fused linear-cross-entropy kernels from other libraries, as alternatives to ours
(``parallel.loss_kernel``; ours is :func:`kha_train.model.loss.chunked_cross_entropy`).

Each computes the same thing as ours, mean cross entropy of logits = hidden @ weight^T over the
positions whose label is not ``ignore_index``, with gradients for hidden and weight, without
materialising the [N, V] logits; they differ in how they tile the work and in their numerics:

- ``liger``: liger-kernel's ``liger_fused_linear_cross_entropy`` (Triton), the weight gradient
  accumulated in fp32 (its default, bf16, loses bits over large vocabularies).
- ``cce``: cut-cross-entropy's ``linear_cross_entropy`` (Triton), with its default gradient
  filtering (entries of the softmax below the bf16 resolution are skipped in the backward).

Both need CUDA and the ``fast`` extra (``pip install 'kha-train[fast]'``); config_checks.py
(``LOSS_KERNEL_REQUIREMENTS``) refuses them elsewhere before any model is built. ``scripts/bench_loss.py`` times each against
ours and checks its loss and gradients.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _liger(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    fn = importlib.import_module("liger_kernel.transformers.functional")
    return fn.liger_fused_linear_cross_entropy(
        hidden, weight, labels, ignore_index=ignore_index, accum_dtype=torch.float32
    )


def _cce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    fn = importlib.import_module("cut_cross_entropy")
    return fn.linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index)


KERNELS: dict[str, LossFn] = {"liger": _liger, "cce": _cce}


def fused_linear_cross_entropy(
    kernel: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Mean cross entropy (a float32 scalar) of hidden [N, D] @ weight [V, D]^T against labels
    [N] by ``kernel`` (liger or cce); hidden and weight in one dtype (model/loss.py casts)."""
    return KERNELS[kernel](hidden, weight, labels, ignore_index).float()
