"""Helpers of the model tests: the tiny configs and builders, comparisons equal up to rounding,
and the causality check."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from kha_train.config import KHAConfig, ModelConfig, MoEConfig
from kha_train.model import Transformer

# The model section of the tiny run configs the tool tests write as YAML (eval, lm-eval, MEA
# virtual heads): a 2-layer KHA-MLP MoE over a 320-token vocabulary.
TINY_MODEL_YAML = """\
model:
  vocab_size: 320
  hidden_size: 32
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  head_dim: 8
  ffn_size: 48
  rope_theta: 10000.0
  attn_backend: math
  kha:
    variant: mlp
    targets: [v]
  moe:
    num_experts: 4
    top_k: 2
    expert_ffn_size: 16
"""


def make_cfg(
    *,
    moe: bool = True,
    kha: str = "none",
    targets: tuple[str, ...] = ("v",),
    **overrides: Any,
) -> ModelConfig:
    """A 3-layer model (first layer dense) small enough for exact CPU checks."""
    moe_kw = overrides.pop("moe_kw", {})  # MoEConfig fields, over the defaults below
    moe_defaults = dict(
        num_experts=4 if moe else 0,
        top_k=2 if moe else 0,
        expert_ffn_size=16 if moe else 0,
        first_k_dense=1 if moe else 0,
    )
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
        moe=MoEConfig(**{**moe_defaults, **moe_kw}),
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


# Two evaluations of the same function whose kernels sum in a different order differ in the last
# bits. CPU kernels choose their blocking from the shapes and from the number of intra-op
# threads (OMP_NUM_THREADS): e.g. changing later tokens regroups the tokens per expert, so a
# prefix token's expert matmul runs at another row count, and with 2 threads its fp32 logits
# (of order 1) have been seen to move by about 1e-7. 32 units of the dtype's epsilon (fp32: 3.8e-6) leave room for
# that through every layer, and stay far below any real change (a one-position causality leak
# moves the logits by 1e-2; test_causality_check_catches_a_one_position_leak).
ROUNDING_ULPS = 32


def rounding_tol(expected: torch.Tensor, ulps: int = ROUNDING_ULPS) -> dict[str, float]:
    """rtol/atol for "equal to expected up to rounding": ulps epsilons of its dtype, relative to
    each value and (atol) to the largest |expected|, so values near zero need no relative
    precision that their inputs never had."""
    rtol = ulps * torch.finfo(expected.dtype).eps
    return dict(rtol=rtol, atol=rtol * expected.detach().abs().max().item())


def assert_equal_up_to_rounding(
    actual: torch.Tensor, expected: torch.Tensor, msg: str | Callable[[str], str] | None = None
) -> None:
    torch.testing.assert_close(actual, expected, **rounding_tol(expected), msg=msg)


def assert_causal(
    model: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    positions: Iterable[int],
    vocab_size: int,
) -> None:
    """For each t: changing every token after t leaves the logits of positions 0..t unchanged
    (up to rounding, see ROUNDING_ULPS) and changes the logits after t."""
    base = model(ids)
    tol = rounding_tol(base)
    for t in positions:
        changed = ids.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % vocab_size  # every one different
        out = model(changed)
        torch.testing.assert_close(
            out[:, : t + 1],
            base[:, : t + 1],
            **tol,
            msg=lambda m, t=t: f"tokens after position {t} changed the logits up to it:\n{m}",
        )
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :], **tol), t
