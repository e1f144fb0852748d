"""The model: a Qwen3-style MoE transformer with knocking-heads attention (see docs/model.md)."""

from kha_train.model.absorb import absorb_kha
from kha_train.model.moe.balance import (
    collect_expert_counts,
    load_stats,
    moe_layers,
    update_expert_bias,
)
from kha_train.model.moe.layer import MoELayer
from kha_train.model.transformer import Block, Transformer, build_attention
from kha_train.model.virtual_heads import convert_to_virtual_heads

__all__ = [
    "Block",
    "MoELayer",
    "Transformer",
    "absorb_kha",
    "build_attention",
    "collect_expert_counts",
    "convert_to_virtual_heads",
    "load_stats",
    "moe_layers",
    "update_expert_bias",
]
