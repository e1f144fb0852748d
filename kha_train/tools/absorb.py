"""Fold KHA-Linear into the attention projections (paper eq. 8), the inference / export path.

Per head i, q_i T = x W_i^T T = x (T^T W_i)^T, where W_i is head i's block of rows of the
[out, in] projection weight. So each head's rows become T^T @ W_i, and the KHA module goes away.
Exact for T^Q and T^K as well, because they act before the QK-norm and RoPE. Where each variant
folds what (all exact; the KHA module does the arithmetic, ``KHA.absorb_into_rows`` /
``absorb_into_output``):

    gqa, mea, talking_heads  T^Q -> q_proj, T^K -> k_proj, T^V -> v_proj   (MEA: the cached
                             heads' rows; the head-axis HLC commutes with the feature-axis T)
    gta                      T^Q -> q_proj, T^V -> o_proj's columns (attention is linear in v:
                             (A V T) W^O^T = A V (W^O T^T)^T); T^K stays: folding it into the
                             tied kv_proj / shared k_rope_proj would break GTA's cache layout
    mla                      T^Q -> the content rows of each head in q_up (W^UQ, or W^Q),
                             T^K -> the key rows and T^V -> the value rows of each KV head in
                             kv_up (W^UKV); the cache (c_kv, k_r) is unchanged

KHA-MLP and the gate are nonlinear and cannot be folded: those modules are left in place.
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.model.attention import Attention
from kha_train.model.attn_gta import GroupedTiedAttention
from kha_train.model.attn_mla import LatentAttention


@torch.no_grad()
def absorb_kha(model: nn.Module) -> nn.Module:
    """Fold every foldable KHA-Linear of ``model`` into its projections and remove it (in place).

    Returns ``model``. Outputs agree with the unabsorbed model up to fp32 rounding.
    """
    for attn in list(model.modules()):
        match attn:
            case GroupedTiedAttention():
                _into_rows(attn, "q", attn.q_proj.weight, rows=attn.head_dim)
                _into_output(attn, "v", attn.o_proj.weight)
            case LatentAttention():
                n, r = attn.head_dim, attn.rope_dim
                _into_rows(attn, "q", attn.q_up.weight, rows=n + r)
                _into_rows(attn, "k", attn.kv_up.weight, rows=2 * n)
                _into_rows(attn, "v", attn.kv_up.weight, rows=2 * n, first=n)
            case Attention():  # GQA, and MEA and talking heads, which extend it
                d = attn.head_dim
                _into_rows(attn, "q", attn.q_proj.weight, rows=d)
                _into_rows(attn, "k", attn.k_proj.weight, rows=d)
                _into_rows(attn, "v", attn.v_proj.weight, rows=d)
    return model


def _into_rows(
    attn: nn.Module, target: str, weight: torch.Tensor, rows: int, first: int = 0
) -> None:
    """Fold ``attn.kha_<target>`` into rows [first, first + d) of every block of ``rows`` rows of
    ``weight`` (one block per head), and drop it, if it is linear."""
    kha = getattr(attn, f"kha_{target}")
    if kha is not None and kha.absorb_into_rows(weight, rows, first):
        setattr(attn, f"kha_{target}", None)


def _into_output(attn: nn.Module, target: str, o_weight: torch.Tensor) -> None:
    """Fold ``attn.kha_<target>`` into the output projection's columns, and drop it, if linear."""
    kha = getattr(attn, f"kha_{target}")
    if kha is not None and kha.absorb_into_output(o_weight):
        setattr(attn, f"kha_{target}", None)
