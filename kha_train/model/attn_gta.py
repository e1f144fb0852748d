"""Grouped-tied attention (GTA; Zadouri, Strauss & Dao 2025, "Hardware-efficient attention for
fast decoding", arXiv 2505.21487), with Qwen3 QK-norm and knocking heads.

Each KV head has one tied projection, and RoPE positions come from a single extra head shared
by all KV heads (r = d/2 features):

    q     = x W^Q                                   [B, T, H, d]
    kv    = x W^KV                                  [B, T, H_kv, d]   (tied: keys and values)
    k_r   = x W^KR                                  [B, T, 1, d/2]    (one RoPE key head)
    k_i   = [kv_i[:d/2], k_r]                       un-rotated half of kv_i, then the shared part
    v_i   = kv_i
    q, k, v = T^Q(q), T^K(k), T^V(v)                knocking heads, where configured
    q, k  = RMSNorm_head(q), RMSNorm_head(k)        over all d features of each assembled head
    q, k  = [q[:d/2], RoPE(q[d/2:])], [k[:d/2], RoPE(k[d/2:])]   RoPE on the last half only
    o     = softmax(q k^T / sqrt(d) + causal mask) v,  out = o W^O

The cache holds kv (H_kv * d values) and k_r (d/2) per token: "512+64" at 4 heads of 128.
Absorption (absorb.py): T^Q folds into W^Q and T^V into W^O (attention is linear in v);
T^K stays, since folding it into W^KV / W^KR would untie keys from values and give every head
its own RoPE part.
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.config import ModelConfig
from kha_train.model.attention import (
    attention_activation_bytes,
    causal_attention,
    checked_backend,
)
from kha_train.model.init import trunc_normal_
from kha_train.model.kha import build_kha_targets, qkv_transforms
from kha_train.model.kv_cache import LayerCache, masked_attention
from kha_train.model.norms import RMSNorm
from kha_train.model.rope import apply_rope


class GroupedTiedAttention(nn.Module):
    """GTA (model.attention=gta); KV cache H_kv * d + d / 2 values per token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.rope_dim = cfg.head_dim // 2
        self.kv_cache_elems = cfg.num_kv_heads * cfg.head_dim + self.rope_dim
        self.backend = checked_backend(cfg)
        D, q_dim = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        self.q_proj = nn.Linear(D, q_dim, bias=False)
        self.kv_proj = nn.Linear(D, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.k_rope_proj = nn.Linear(D, self.rope_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, D, bias=False)
        self.kha_q, self.kha_k, self.kha_v = build_kha_targets(
            cfg.kha.variant, cfg.kha.targets, cfg.head_dim
        )
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, d, r = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dim
        q = self.q_proj(x).view(B, T, H, d)  # (B, T, H, d)
        kv = self.kv_proj(x).view(B, T, Hkv, d)  # (B, T, Hkv, d)
        if cache is not None:
            return self._forward_cached(x, q, kv, rope, cache)
        k_r = self.k_rope_proj(x).view(B, T, 1, r).expand(B, T, Hkv, r)  # (B, T, Hkv, d/2)
        k = torch.cat((kv[..., : d - r], k_r), dim=-1)  # (B, T, Hkv, d)
        t_q, t_k, t_v = qkv_transforms(self)
        q, k, v = t_q(q), t_k(k), t_v(kv)  # on the assembled heads
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate_last(q, r, rope), _rotate_last(k, r, rope)
        o = causal_attention(q, k, v, self.backend)  # (B, T, H, d)
        return self.o_proj(o.reshape(B, T, H * d))

    def _forward_cached(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        kv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache,
    ) -> torch.Tensor:
        """Inference (kv_cache.py): caches kv and the shared RoPE key k_r as projected ("512+64")
        and assembles, knocks, normalises and rotates the keys of all S positions each step;
        rope holds the tables of all S positions, the new tokens being the last T."""
        B, T, _ = x.shape
        H, Hkv, d, r = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dim
        kv, k_r = cache.update(kv, self.k_rope_proj(x).view(B, T, 1, r))  # (B, S, Hkv|1, d|r)
        S = kv.shape[1]
        k = torch.cat((kv[..., : d - r], k_r.expand(B, S, Hkv, r)), dim=-1)  # (B, S, Hkv, d)
        t_q, t_k, t_v = qkv_transforms(self)
        q, k, v = t_q(q), t_k(k), t_v(kv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope  # (S, r/2) each
        q, k = _rotate_last(q, r, (cos[-T:], sin[-T:])), _rotate_last(k, r, rope)
        o = masked_attention(q, k, v, cache.mask)  # (B, T, H, d)
        return self.o_proj(o.reshape(B, T, H * d))

    def flops_per_token(self, seq_len: int) -> int:
        """As GQA: q k^T over d features and the weighted sum of d-wide values."""
        return 6 * self.num_heads * (self.head_dim + self.head_dim) * seq_len

    def activation_bytes_per_token(self, d_model: int, seq_len: int) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return attention_activation_bytes(d_model, q, kv, kv, q) + 2 * kv  # + the kv_proj output

    def reset_parameters(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.kv_proj, self.k_rope_proj):
            trunc_normal_(proj.weight, std)
        trunc_normal_(self.o_proj.weight, out_std)
        for m in (self.kha_q, self.kha_k, self.kha_v, self.q_norm, self.k_norm):
            if m is not None:
                m.reset_parameters()


def _rotate_last(
    x: torch.Tensor, rope_dim: int, rope: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """RoPE on the last rope_dim features of every head of x [B, T, heads, d]; the rest as is."""
    cos, sin = rope  # (T, rope_dim / 2) each
    nope, rot = x.split((x.shape[-1] - rope_dim, rope_dim), dim=-1)
    return torch.cat((nope, apply_rope(rot, cos, sin)), dim=-1)
