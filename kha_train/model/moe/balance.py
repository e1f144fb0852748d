"""Expert load balancing across a whole model: count collection, bias update, load statistics.

The trainer calls, once per optimizer step (after ``optimizer.step()``)::

    counts = collect_expert_counts(model)      # [n_moe_layers, E], device tensor, no sync
    dist.all_reduce(counts)                    # sum over data-parallel ranks
    update_expert_bias(model, counts)          # b <- rule(F), then zero the count buffers
    stats = load_stats(counts)                 # at logging steps

With F_i = counts_i / sum(counts) (the share of routed assignments expert i got) and Q = 1/E:

- loss_free_sign (Wang et al. 2024):   b <- b - u * sign(F - Q)
- loss_free_rms  (Su 2025, the paper): b <- b - u * (F - Q) / RMS(F - Q),  RMS = sqrt(mean((F - Q)^2))
- none / aux_loss: the bias stays at zero (aux_loss balances through the loss instead).
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.config import Balancing
from kha_train.model.moe.layer import MoELayer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of ``model``, in module order (the row order of the count tensors)."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def collect_expert_counts(model: nn.Module) -> torch.Tensor:
    """Assignments per expert since the last update: [n_moe_layers, E] fp32 (a copy)."""
    layers = moe_layers(model)
    if not layers:  # a dense model: an empty tensor on the model's device
        return torch.zeros(0, 0, device=next(model.parameters()).device)
    return torch.stack([layer.expert_counts.float() for layer in layers])


@torch.no_grad()
def update_expert_bias(model: nn.Module, counts: torch.Tensor) -> None:
    """Apply each layer's balancing rule to its ``expert_bias`` from ``counts`` (summed over the
    step's micro-batches and ranks), then zero the count buffers."""
    layers = moe_layers(model)
    if counts.shape[0] != len(layers):
        raise ValueError(
            f"counts has {counts.shape[0]} rows but the model has {len(layers)} MoE layers; "
            "pass the tensor from collect_expert_counts(model)"
        )
    for layer, c in zip(layers, counts):
        delta = bias_delta(c.to(layer.expert_bias.device), layer.balancing, layer.bias_update_rate)
        if delta is not None:
            layer.expert_bias.add_(delta)
        layer.expert_counts.zero_()


def bias_delta(counts: torch.Tensor, rule: Balancing, rate: float) -> torch.Tensor | None:
    """The bias change for one layer's counts [E] under ``rule`` (None: the rule moves nothing).
    A layer that saw no tokens gets no change (decided on the device, without a sync)."""
    total = counts.sum()
    share = counts.float() / total.clamp_min(1)  # F
    err = share - 1.0 / counts.numel()  # F - Q
    match Balancing(rule):
        case Balancing.none | Balancing.aux_loss:
            return None
        case Balancing.loss_free_sign:
            step = torch.sign(err)
        case Balancing.loss_free_rms:
            rms = err.square().mean().sqrt()
            step = err / rms.clamp_min(1e-12)  # perfectly balanced: err = 0 -> no change
    return torch.where(total > 0, -rate * step, torch.zeros_like(step))


@torch.no_grad()
def load_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer load statistics of counts [n_layers, E], each a tensor [n_layers]:

    - max_violation: max_i F_i * E - 1 (0 when balanced; 1 means an expert got twice its share)
    - min_share / max_share: the smallest and largest F_i
    - dead_experts: experts that received no tokens
    """
    counts = counts.float()
    E = counts.shape[-1]
    share = counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)
    return {
        "max_violation": share.amax(dim=-1) * E - 1,
        "min_share": share.amin(dim=-1),
        "max_share": share.amax(dim=-1),
        "dead_experts": (counts == 0).sum(dim=-1).float(),
    }
