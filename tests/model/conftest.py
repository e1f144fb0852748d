"""Tiny model configs and builders shared by the model tests (CPU, fp32, a few ms each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from kha_train.config import KHAConfig, ModelConfig, MoEConfig
from kha_train.model import Transformer


def make_cfg(
    *,
    moe: bool = True,
    kha: str = "none",
    targets: tuple[str, ...] = ("v",),
    **overrides: Any,
) -> ModelConfig:
    """A 3-layer model (first layer dense) small enough for exact CPU checks."""
    moe_kw = overrides.pop("moe_kw", {})
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffn_size=48,
        rope_theta=10000.0,
        attn_backend="math",
        moe=MoEConfig(
            num_experts=4 if moe else 0,
            top_k=2 if moe else 0,
            expert_ffn_size=16 if moe else 0,
            first_k_dense=1 if moe else 0,
            **moe_kw,
        ),
        kha=KHAConfig(variant=kha, targets=list(targets)),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    torch.manual_seed(seed)  # init_weights draws every random value: seed right before it
    model.init_weights()
    return model


@pytest.fixture
def tiny_cfg() -> Callable[..., ModelConfig]:
    return make_cfg


@pytest.fixture
def build_model() -> Callable[..., Transformer]:
    return build
