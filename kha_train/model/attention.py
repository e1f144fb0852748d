"""Causal self-attention with grouped KV heads (MHA / GQA / MQA), Qwen3 QK-norm and KHA.

    q, k, v = x W^Q, x W^K, x W^V                 (bias-free; per-head views)
    q, k, v = T^Q(q), T^K(k), T^V(v)               (knocking heads, where configured)
    q, k    = RMSNorm_head(q), RMSNorm_head(k)     (Qwen3 QK-norm: after KHA, before RoPE)
    q, k    = RoPE(q), RoPE(k)
    o       = softmax(q k^T / sqrt(d_head) + causal mask) v    (SDPA, KV heads shared by groups)
    out     = o W^O

MHA, GQA and MQA differ only in num_kv_heads (= num_heads, a divisor, 1).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kha_train.config import AttnBackend, ModelConfig
from kha_train.model.init import trunc_normal_
from kha_train.model.kha import build_kha
from kha_train.model.norms import RMSNorm
from kha_train.model.rope import apply_rope

_SDPA_BACKENDS = {
    AttnBackend.cudnn: SDPBackend.CUDNN_ATTENTION,
    AttnBackend.flash: SDPBackend.FLASH_ATTENTION,
    AttnBackend.efficient: SDPBackend.EFFICIENT_ATTENTION,
    AttnBackend.math: SDPBackend.MATH,
}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.backend = AttnBackend(cfg.attn_backend)
        if (
            self.backend == AttnBackend.flash_attn
            and importlib.util.find_spec("flash_attn") is None
        ):
            raise ImportError(
                "model.attn_backend=flash_attn needs the flash-attn package "
                "(pip install 'kha-train[flash]'), or choose model.attn_backend=auto or cudnn"
            )
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        targets = set(cfg.kha.targets)
        self.kha_q = build_kha(cfg.kha.variant, cfg.head_dim) if "q" in targets else None
        self.kha_k = build_kha(cfg.kha.variant, cfg.head_dim) if "k" in targets else None
        self.kha_v = build_kha(cfg.kha.variant, cfg.head_dim) if "v" in targets else None
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, d)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, d)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, d)
        if self.kha_q is not None:
            q = self.kha_q(q)
        if self.kha_k is not None:
            k = self.kha_k(k)
        if self.kha_v is not None:
            v = self.kha_v(v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self._attend(q, k, v)  # (B, T, H, d)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [B, T, H, d] over k, v [B, T, Hkv, d] -> [B, T, H, d]."""
        if self.backend == AttnBackend.flash_attn:
            from flash_attn import flash_attn_func  # GQA-native, takes the (B, T, heads, d) layout

            return flash_attn_func(q, k, v, causal=True)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        gqa = self.num_kv_heads != self.num_heads
        if gqa and self.backend == AttnBackend.efficient:
            # The memory-efficient kernel has no GQA support: give every query head its KV head.
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            gqa = False
        ctx = (
            contextlib.nullcontext()
            if self.backend == AttnBackend.auto
            else sdpa_kernel(_SDPA_BACKENDS[self.backend])
        )
        with ctx:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return o.transpose(1, 2)  # (B, T, H, d)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            trunc_normal_(proj.weight, std)
        trunc_normal_(self.o_proj.weight, out_std)
        for m in (self.kha_q, self.kha_k, self.kha_v, self.q_norm, self.k_norm):
            if m is not None:
                m.reset_parameters()
