"""How far the knocking-heads matrices have moved from their initial values, logged with every
train record as ``kha_drift`` (one value per layer with KHA: the mean over its matrices of
||W - W_0||_F / ||I||_F, W_0 = I, or 0 for a gate): the paper's Fig. 3 question, whether the
learned transforms stay near the identity, answered over training rather than at its end.

Under FSDP2 each matrix is gathered whole first (``full_tensor``: a collective, so every rank
computes it, at logging steps only; the matrices are d_head x d_head); with
``parallel.single_device`` its fp32 master weight is read.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from kha_train.model.kha import KHA, drift_from_init
from kha_train.training.flat_params import FlatParams, flat_params_of


def kha_drift(model: nn.Module) -> list[float]:
    """Per layer that has KHA matrices, their mean drift from init (empty without KHA); one
    device-to-host copy for all of them."""
    flat = flat_params_of(model)
    out = []
    for block in model.layers:
        values = []
        for module in block.modules():
            if not isinstance(module, KHA):
                continue
            params = dict(module.named_parameters(recurse=False))
            if params:
                weights = {n: _full_fp32(p, flat) for n, p in params.items()}
                values.append(drift_from_init(module, weights))
        if values:
            out.append(torch.stack(values).mean())
    return torch.stack(out).tolist() if out else []


def _full_fp32(p: torch.Tensor, flat: FlatParams | None) -> torch.Tensor:
    """The whole fp32 weight: gathered from FSDP2's shards, or with ``parallel.single_device``
    the master (its bf16 copy would round a drift of 1e-3 from the identity away)."""
    if isinstance(p, DTensor):
        return p.full_tensor()
    return flat.master_of(p) if flat is not None and p in flat.offsets else p
