"""Activation checkpointing of the transformer blocks (``parallel.activation_checkpointing``).

- ``full`` / ``every_n``: a checkpointed block keeps only its input; the backward runs its whole
  forward again (a third more compute for every checkpointed block).
- ``selective``: every block is checkpointed, but the forward keeps the outputs of its matrix
  products: the dense and grouped GEMMs (projections, router, experts, KHA matrices, FP8 GEMMs)
  and the attention kernel (with its softmax statistics). The backward recomputes only the cheap
  steps between them: norms, RoPE, the SwiGLU activation and product, routing's top-k, sorts and
  gathers, KHA-MLP's gate. Nearly no extra FLOPs; the memory saved is what those steps would
  have kept (their fp32 norm copies, the activation inputs, the gathered rows of the experts).

Checkpointing is non-reentrant (works with FSDP2 and torch.compile) and keeps no RNG state: the
model has no dropout. A re-run forward does not count expert loads twice (moe/layer.py).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from kha_train.config import ACMode, ParallelConfig


def _ops(*names: str) -> frozenset[Any]:
    """The aten overload packets of ``names`` this torch build has."""
    return frozenset(getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n))


# Whose outputs selective checkpointing keeps. Overload packets: a policy sees the overload
# (e.g. aten.mm.default); its ``overloadpacket`` is matched.
SAVED_OPS = _ops(
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward",
)  # fmt: skip


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if getattr(op, "overloadpacket", op) in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_blocks(cfg: ParallelConfig, num_layers: int) -> list[int]:
    """Indices of the blocks ``cfg`` checkpoints."""
    mode = ACMode(cfg.activation_checkpointing)
    if mode == ACMode.none:
        return []
    every = cfg.ac_every_n if mode == ACMode.every_n else 1
    return [i for i in range(num_layers) if i % every == 0]


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> None:
    """Wrap the blocks of ``model.layers`` that ``cfg`` checkpoints, in place."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs: dict[str, Any] = {}
    if cfg.activation_checkpointing == ACMode.selective:
        kwargs["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, _keep_matmuls
        )
    for i in checkpointed_blocks(cfg, len(model.layers)):
        model.layers[i] = checkpoint_wrapper(model.layers[i], preserve_rng_state=False, **kwargs)
