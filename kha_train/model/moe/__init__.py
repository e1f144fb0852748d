"""Mixture-of-Experts feed-forward layer and its load balancing."""

from kha_train.model.moe.balance import (
    bias_delta,
    collect_expert_counts,
    load_stats,
    moe_layers,
    update_expert_bias,
)
from kha_train.model.moe.experts import GroupedExperts
from kha_train.model.moe.layer import MoELayer
from kha_train.model.moe.router import Router

__all__ = [
    "GroupedExperts",
    "MoELayer",
    "Router",
    "bias_delta",
    "collect_expert_counts",
    "load_stats",
    "moe_layers",
    "update_expert_bias",
]
