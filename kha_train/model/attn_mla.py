"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434) with KHA-Linear.

Keys and values are up-projected from one small latent per token, which is what the cache
holds, plus a decoupled RoPE key shared by all heads (n = model.head_dim content features,
r = model.mla.rope_head_dim, c = kv_lora_rank, c_q = q_lora_rank):

    c_q        = RMSNorm(x W^DQ)                           [B, T, c_q]     (q_lora_rank > 0)
    q          = c_q W^UQ   (or x W^Q)  = [q_n, q_r]       [B, T, H, n + r]
    [c_kv, k_r]= x W^DKV                                   [B, T, c], [B, T, r]
    [k_n, v]   = RMSNorm(c_kv) W^UKV                        [B, T, H_kv, n], [B, T, H_kv, n]
    q_n, k_n, v = T^Q(q_n), T^K(k_n), T^V(v)               KHA-Linear, where configured
    q = [q_n, RoPE(q_r)],  k = [k_n, RoPE(k_r) for every head]
    o = softmax(q k^T / sqrt(n + r) + causal mask) v,  out = o W^O

The cache per token is c + r values ("512+64"). KHA acts on the content features only: the
RoPE key is one shared head, so there is nothing on it for heads to knock on. At inference MLA
never materialises per-head keys or values (W^UK is folded into the queries, W^UV into W^O), so
only KHA-Linear applies (paper 4.2.3; config validation rejects mlp and gate); `absorb_kha`
folds T^Q into the q_n rows of W^UQ (W^Q), T^K into the k_n rows and T^V into the v rows of
W^UKV, after which the usual MLA inference folding applies unchanged.

There is no per-head QK-norm (model.qk_norm must be false): the latent norms take its place.
With H_kv < H the up-projected heads are shared by groups of query heads, as in GQA.
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


class LatentAttention(nn.Module):
    """MLA (model.attention=mla); KV cache kv_lora_rank + rope_head_dim values per token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        mla = cfg.mla
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim  # content part of q / k, and the value width
        self.rope_dim = mla.rope_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        self.kv_cache_elems = mla.kv_lora_rank + mla.rope_head_dim
        self.backend = checked_backend(cfg)
        D, H, n, r = cfg.hidden_size, cfg.num_heads, cfg.head_dim, mla.rope_head_dim
        if mla.q_lora_rank > 0:
            self.q_down = nn.Linear(D, mla.q_lora_rank, bias=False)
            self.q_latent_norm = RMSNorm(mla.q_lora_rank, cfg.norm_eps)
            self.q_up = nn.Linear(mla.q_lora_rank, H * (n + r), bias=False)
        else:
            self.q_down, self.q_latent_norm = None, None
            self.q_up = nn.Linear(D, H * (n + r), bias=False)  # W^Q (no latent), same name
        self.kv_down = nn.Linear(D, mla.kv_lora_rank + r, bias=False)  # c_kv and k_r
        self.kv_latent_norm = RMSNorm(mla.kv_lora_rank, cfg.norm_eps)
        self.kv_up = nn.Linear(mla.kv_lora_rank, cfg.num_kv_heads * 2 * n, bias=False)
        self.o_proj = nn.Linear(H * n, D, bias=False)
        self.kha_q, self.kha_k, self.kha_v = build_kha_targets(cfg.kha.variant, cfg.kha.targets, n)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, n, r = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dim
        c_q = x if self.q_down is None else self.q_latent_norm(self.q_down(x))
        q_n, q_r = self.q_up(c_q).view(B, T, H, n + r).split((n, r), dim=-1)  # (B, T, H, n|r)
        c_kv, k_r = self.kv_down(x).split((self.kv_lora_rank, r), dim=-1)  # (B, T, c), (B, T, r)
        cos, sin = rope  # (T, r / 2) each; with a cache (S, r / 2), the new tokens the last T
        q_cos, q_sin = cos, sin
        if cache is not None:
            c_kv, k_r = cache.update(c_kv, k_r)  # (B, S, c), (B, S, r): the "512+64"
            q_cos, q_sin = cos[-T:], sin[-T:]
        S = c_kv.shape[1]
        kv = self.kv_up(self.kv_latent_norm(c_kv)).view(B, S, Hkv, 2 * n)  # (B, S, Hkv, 2n)
        k_n, v = kv.split((n, n), dim=-1)  # (B, S, Hkv, n) each
        t_q, t_k, t_v = qkv_transforms(self)
        q_n, k_n, v = t_q(q_n), t_k(k_n), t_v(v)  # content features only
        q_r = apply_rope(q_r, q_cos, q_sin)
        k_r = apply_rope(k_r.view(B, S, 1, r), cos, sin).expand(B, S, Hkv, r)
        q = torch.cat((q_n, q_r), dim=-1)  # (B, T, H, n + r)
        k = torch.cat((k_n, k_r), dim=-1)  # (B, S, Hkv, n + r)
        if cache is None:
            o = causal_attention(q, k, v, self.backend)  # (B, T, H, n)
        else:  # re-up-projected from the cached latents each step: simple and exact
            o = masked_attention(q, k, v, cache.mask)  # (B, T, H, n)
        return self.o_proj(o.reshape(B, T, H * n))

    def flops_per_token(self, seq_len: int) -> int:
        """q k^T over n + r features and the weighted sum of n-wide values, forward + backward."""
        return 6 * self.num_heads * (self.head_dim + self.rope_dim + self.head_dim) * seq_len

    def activation_bytes_per_token(self, d_model: int, seq_len: int) -> int:
        H, Hkv, n, r = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dim
        q_latent = 0 if self.q_down is None else self.q_up.in_features
        latent_norms = 6 * (self.kv_lora_rank + q_latent)  # bf16 latents + fp32 norm copies
        qkvo = attention_activation_bytes(d_model, H * (n + r), Hkv * (n + r), Hkv * n, H * n)
        return qkvo + latent_norms

    def reset_parameters(self, std: float, out_std: float) -> None:
        for proj in (self.q_down, self.q_up, self.kv_down, self.kv_up):
            if proj is not None:
                trunc_normal_(proj.weight, std)
        trunc_normal_(self.o_proj.weight, out_std)
        for m in (self.q_latent_norm, self.kv_latent_norm, self.kha_q, self.kha_k, self.kha_v):
            if m is not None:
                m.reset_parameters()
