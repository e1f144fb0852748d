"""Knocking-heads projections (Zhou et al. 2025, arXiv 2510.23052, section 3).

Each module acts on the features *inside* every head with one d_head x d_head matrix (or three,
for the MLP) shared by all heads of its target (all query heads for q, all KV heads for k/v).
Heads are processed together as one matmul over [B, T, heads, d_head] @ [d_head, d_head].
Matrices are stored in the paper's orientation (row vectors times matrix: y = x @ T).

Every variant is *exactly* the identity at initialisation (paper 3.3), so a KHA model starts
out computing the same function as the model without KHA:

- linear (eqs. 5-7):  y = x T,                                   T = I
- mlp    (eq. 9):     y = 2 * ((x W_up) * sigmoid(x W_gate)) W_down, W_up = W_down = I, W_gate = 0
- gate   (Table 2):   y = x * 2 sigmoid(x W_gate),               W_gate = 0   (an ablation that hurts)

:func:`absorb_kha` (in ``absorb.py``) folds the linear variant into the q/k/v projections.
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.config import KHAVariant
from kha_train.model.init import fill_identity_


class KHALinear(nn.Module):
    """y = x @ T with one T [d_head, d_head] shared by all heads."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, heads, d_head)
        return x @ self.weight.to(x.dtype)

    def reset_parameters(self) -> None:
        fill_identity_(self.weight)


class KHAMLP(nn.Module):
    """y = 2 * ((x W_up) * sigmoid(x W_gate)) W_down, all three [d_head, d_head], shared by heads."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.w_up = nn.Parameter(torch.empty(head_dim, head_dim))
        self.w_gate = nn.Parameter(torch.empty(head_dim, head_dim))
        self.w_down = nn.Parameter(torch.empty(head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, heads, d_head)
        return self.gated(x) @ self.w_down.to(x.dtype)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """2 * (x W_up) * sigmoid(x W_gate): the MLP before W_down (which attention, being
        linear in V, lets ``Attention`` fold into its output projection)."""
        # x W_up and x W_gate as one matmul against [W_up | W_gate] (d, 2d): one GEMM instead of
        # two, forward and backward (these GEMMs are small: a launch saved is time saved).
        w_up_gate = torch.cat([self.w_up, self.w_gate], dim=1).to(x.dtype)  # (d, 2d)
        up, gate = (x @ w_up_gate).chunk(2, dim=-1)  # (B, T, heads, d) each
        # The factor 2 makes 2 * sigmoid(0) = 1: the identity at init.
        return 2 * (up * torch.sigmoid(gate))

    def reset_parameters(self) -> None:
        fill_identity_(self.w_up)
        fill_identity_(self.w_down)
        nn.init.zeros_(self.w_gate)


class KHAGate(nn.Module):
    """y = x * 2 sigmoid(x W_gate): the paper's gate-only ablation (Table 2, +0.063 loss)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, heads, d_head)
        return x * (2 * torch.sigmoid(x @ self.w_gate.to(x.dtype)))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.w_gate)


def build_kha_targets(
    variant: KHAVariant, targets: list[str], head_dim: int
) -> tuple[nn.Module | None, nn.Module | None, nn.Module | None]:
    """The KHA modules of q, k and v (None for a target not in ``targets``), as every attention
    module stores them: ``self.kha_q, self.kha_k, self.kha_v = build_kha_targets(...)``."""

    def one(target: str) -> nn.Module | None:
        return build_kha(variant, head_dim) if target in targets else None

    return one("q"), one("k"), one("v")


def knock(kha: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """x through its target's KHA module, or unchanged without one."""
    return x if kha is None else kha(x)


def build_kha(variant: KHAVariant, head_dim: int) -> nn.Module | None:
    """The KHA module of one target (q, k or v), or None for variant none."""
    match variant:
        case KHAVariant.none:
            return None
        case KHAVariant.linear:
            return KHALinear(head_dim)
        case KHAVariant.mlp:
            return KHAMLP(head_dim)
        case KHAVariant.gate:
            return KHAGate(head_dim)
    raise ValueError(f"unknown model.kha.variant {variant!r}: use none, linear, mlp or gate")
