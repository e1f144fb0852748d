"""Fold KHA-Linear into the attention projections (paper eq. 8), the inference / export path.

Per head i, q_i T = x W_i^T T = x (T^T W_i)^T, where W_i is head i's block of rows of the
[out, in] projection weight. So each head's rows become T^T @ W_i, and the KHA module goes away.
Exact for T^Q and T^K as well, because they act before the QK-norm and RoPE. Where each variant
folds what (all exact):

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
from kha_train.model.kha import KHALinear


@torch.no_grad()
def absorb_kha(model: nn.Module) -> nn.Module:
    """Fold every foldable KHA-Linear of ``model`` into its projections and remove it (in place).

    Returns ``model``. Outputs agree with the unabsorbed model up to fp32 rounding.
    """
    for attn in list(model.modules()):
        match attn:
            case GroupedTiedAttention():
                _fold(attn, "q", attn.q_proj.weight, rows=attn.head_dim, first=0)
                if isinstance(attn.kha_v, KHALinear):
                    _fold_into_output(attn.o_proj.weight, attn.kha_v.weight, attn.head_dim)
                    attn.kha_v = None
            case LatentAttention():
                n, r = attn.head_dim, attn.rope_dim
                _fold(attn, "q", attn.q_up.weight, rows=n + r, first=0)
                _fold(attn, "k", attn.kv_up.weight, rows=2 * n, first=0)
                _fold(attn, "v", attn.kv_up.weight, rows=2 * n, first=n)
            case Attention():  # GQA, and MEA and talking heads, which extend it
                d = attn.head_dim
                _fold(attn, "q", attn.q_proj.weight, rows=d, first=0)
                _fold(attn, "k", attn.k_proj.weight, rows=d, first=0)
                _fold(attn, "v", attn.v_proj.weight, rows=d, first=0)
    return model


def _fold(attn: nn.Module, target: str, weight: torch.Tensor, rows: int, first: int) -> None:
    """If ``attn.kha_<target>`` is a KHA-Linear T [d, d], replace rows [first, first + d) of every
    block of ``rows`` rows of ``weight`` (one block per head) by T^T @ those rows; drop T."""
    kha = getattr(attn, f"kha_{target}")
    if not isinstance(kha, KHALinear):
        return
    d = kha.weight.shape[0]
    w = weight.view(-1, rows, weight.shape[1])  # (heads, rows per head, in)
    part = w[:, first : first + d]  # (heads, d, in): the rows T acts on
    part.copy_(torch.matmul(kha.weight.T.to(w.dtype), part))  # T^T @ W_i
    setattr(attn, f"kha_{target}", None)


def _fold_into_output(o_weight: torch.Tensor, t: torch.Tensor, d: int) -> None:
    """out = sum_i (o_i T) W_i^T = sum_i o_i (W_i T^T)^T: each head's column block W_i [D, d] of
    the output projection becomes W_i @ T^T."""
    w = o_weight.view(o_weight.shape[0], -1, d)  # (D, heads, d)
    w.copy_(torch.matmul(w.transpose(0, 1), t.T.to(w.dtype)).transpose(0, 1))
