"""The model: a Qwen3-style MoE transformer with knocking-heads attention (see docs/model.md)."""

from kha_train.model.moe.balance import (
    collect_expert_counts,
    load_stats,
    moe_layers,
    update_expert_bias,
)
from kha_train.model.moe.layer import MoELayer
from kha_train.model.transformer import Block, Transformer, build_attention

__all__ = [
    "Block",
    "MoELayer",
    "Transformer",
    "build_attention",
    "collect_expert_counts",
    "load_stats",
    "moe_layers",
    "update_expert_bias",
]
