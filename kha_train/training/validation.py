"""The validation loss: the mean next-token loss over the first micro-batches of the val split,
over every target token of every rank (the same batches at every pass)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kha_train.data.loader import PackedLoader
from kha_train.model.loss import IGNORE_INDEX


@torch.no_grad()
def validation_loss(model: nn.Module, loader: PackedLoader, n_batches: int) -> float:
    """Mean loss over ``n_batches`` micro-batches per rank of ``loader``'s split, weighted by
    target tokens and summed over ranks (a collective: every rank calls it). One host sync."""
    model.eval()
    total = torch.zeros(2, device=loader.device)  # sum of loss x tokens, tokens
    for batch in loader.eval_batches(n_batches):
        n = (batch.labels != IGNORE_INDEX).sum().float()
        total += torch.stack([model(batch.input_ids, batch.labels).float() * n, n])
    model.train()
    if loader.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp_min(1)).item()
