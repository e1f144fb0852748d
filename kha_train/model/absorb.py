"""Fold KHA-Linear into the attention projections (paper eq. 8), the inference / export path.

Per head i, q_i T = x W_i^T T = x (T^T W_i)^T, where W_i is head i's block of rows of the
[out, in] projection weight. So each head's rows become T^T @ W_i, and the KHA module goes away.
Exact for T^Q and T^K as well, because they act before the QK-norm and RoPE.
KHA-MLP and the gate are nonlinear and cannot be folded: those modules are left in place.
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.model.attention import Attention
from kha_train.model.kha import KHALinear


@torch.no_grad()
def absorb_kha(model: nn.Module) -> nn.Module:
    """Fold every KHA-Linear of ``model`` into its q/k/v projection and remove it (in place).

    Returns ``model``. Outputs agree with the unabsorbed model up to fp32 rounding.
    """
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        for target, proj in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj)):
            kha = getattr(attn, f"kha_{target}")
            if not isinstance(kha, KHALinear):
                continue
            d = attn.head_dim
            w = proj.weight.view(-1, d, proj.weight.shape[1])  # (heads, d_head, D)
            folded = torch.matmul(kha.weight.T.to(w.dtype), w)  # (heads, d_head, D): T^T @ W_i
            proj.weight.copy_(folded.view_as(proj.weight))
            setattr(attn, f"kha_{target}", None)
    return model
