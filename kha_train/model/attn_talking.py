"""Talking-heads attention (Shazeer, Lan, Cheng, Ding & Hou 2020, arXiv 2003.02436) on top of
GQA and KHA: a reference baseline for head interaction. Slow by construction.

The attention map of every query head is materialised and mixed across heads twice, with
learned H x H matrices, before and after the softmax:

    L[h]  = q_h k_{g(h)}^T / sqrt(d)                 [B, H, T, T]   logits (g: head -> KV head)
    L'[i] = sum_h P_L[h, i] L[h]                     pre-softmax mixing
    A[i]  = softmax(L'[i] + causal mask)
    A'[i] = sum_h P_W[h, i] A[h]                     post-softmax mixing
    o_i   = A'[i] v_{g(i)}

P_L and P_W start as the identity, so the model starts as GQA with the same weights. No fused
kernel can do the mixing (the paper's Table 6 says as much), so this always runs the math path:
memory O(B H T^2) (about 4.3 GB of fp32 map per layer for B=2, H=32, T=4096) and FLOPs of two
extra H x H mixes per position pair. Everything else (projections, KHA, QK-norm, RoPE, the KV
cache of 2 H_kv d values per token, absorption) is GQA's.
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.config import ModelConfig
from kha_train.model.attention import Attention
from kha_train.model.init import fill_identity_


class TalkingHeadsAttention(Attention):
    """Talking heads (model.attention=talking_heads); KV cache 2 * H_kv * d values per token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.logit_mix = nn.Parameter(torch.empty(cfg.num_heads, cfg.num_heads))  # P_L
        self.weight_mix = nn.Parameter(torch.empty(cfg.num_heads, cfg.num_heads))  # P_W

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal talking-heads attention of q [B, T, H, d] over k, v [B, T, Hkv, d]."""
        T = q.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        return self._talk(q, k, v, future)

    def _attend_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Inference: new queries q [B, T, H, d] over cached k, v [B, S, Hkv, d]. Each query's
        row of the map mixes across heads only, so a decoding step needs just its own row."""
        return self._talk(q, k, v, ~mask)

    def _talk(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor
    ) -> torch.Tensor:
        """q [B, T, H, d] over k, v [B, S, Hkv, d]; blocked: True where query t may not read key
        s, broadcastable to (B, H, T, S)."""
        H, d = q.shape[2], q.shape[3]
        groups = H // k.shape[2]
        q = q.transpose(1, 2)  # (B, H, T, d)
        k = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # (B, H, S, d)
        v = v.transpose(1, 2).repeat_interleave(groups, dim=1)  # (B, H, S, d)
        logits = (q @ k.transpose(-1, -2)) * d**-0.5  # (B, H, T, S)
        logits = torch.einsum("bhts,hi->bits", logits, self.logit_mix.to(logits.dtype))
        # Softmax in fp32 (bf16 logits lose the small differences between large values).
        weights = logits.float().masked_fill(blocked, float("-inf")).softmax(dim=-1)
        weights = weights.to(v.dtype)
        weights = torch.einsum("bhts,hi->bits", weights, self.weight_mix.to(weights.dtype))
        return (weights @ v).transpose(1, 2)  # (B, T, H, d)

    def flops_per_token(self, seq_len: int) -> int:
        """GQA's, plus the two H x H mixes of every query's seq_len map entries (fwd + bwd)."""
        return super().flops_per_token(seq_len) + 6 * 2 * self.num_heads**2 * seq_len

    def activation_bytes_per_token(self, d_model: int, seq_len: int) -> int:
        # Logits, mixed logits, fp32 softmax output, its bf16 copy and the mixed weights, per
        # head per key (no causal discount: the full T x T map is allocated).
        maps = (2 + 2 + 4 + 2 + 2) * self.num_heads * seq_len
        return super().activation_bytes_per_token(d_model, seq_len) + maps

    def reset_parameters(self, std: float, out_std: float) -> None:
        super().reset_parameters(std, out_std)
        fill_identity_(self.logit_mix)
        fill_identity_(self.weight_mix)
