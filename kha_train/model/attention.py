"""Causal self-attention with grouped KV heads (MHA / GQA / MQA), Qwen3 QK-norm and KHA.

    q, k, v = x W^Q, x W^K, x W^V                 (bias-free; per-head views)
    q, k, v = T^Q(q), T^K(k), T^V(v)               (knocking heads, where configured)
    q, k    = RMSNorm_head(q), RMSNorm_head(k)     (Qwen3 QK-norm: after KHA, before RoPE)
    q, k    = RoPE(q), RoPE(k)
    o       = softmax(q k^T / sqrt(d_head) + causal mask) v    (SDPA, KV heads shared by groups)
    out     = o W^O

MHA, GQA and MQA differ only in num_kv_heads (= num_heads, a divisor, 1). The forward is split
into steps (project, knock, norm_and_rotate, _attend, merge_heads, project_out) so that MEA
(attn_mea.py) and talking heads (attn_talking.py), which are this attention plus one change,
override one step.
Each KHA transform T is evaluated in its cheapest order, the same function and gradients (see
kha.py): its linear first part (KHA-Linear) folded into W^Q / W^K / W^V, the rest on the heads,
and on V its linear last part (KHA-MLP's W_down) folded into W^O, since o is linear in v.
:func:`causal_attention` is the fused-kernel call every variant shares.

Every attention module also accounts for itself (used by flops.py and `kha-train info`):
``rope_dim`` (features RoPE rotates per head), ``kv_cache_elems`` (values cached per token and
layer), ``flops_per_token(seq_len)`` (training FLOPs not counted by 6 x parameters) and
``activation_bytes_per_token(d_model, seq_len)`` (a rough count of what autograd keeps); its KHA
modules count themselves (``KHA.flops_per_token``, ``KHA.activation_bytes_per_token``).
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kha_train.config import AttnBackend, ConfigError, ModelConfig
from kha_train.config_checks import FLASH_ATTN_MISSING
from kha_train.model.init import trunc_normal_
from kha_train.model.kha import build_kha_targets, qkv_transforms
from kha_train.model.kv_cache import LayerCache, masked_attention
from kha_train.model.norms import RMSNorm
from kha_train.model.rope import apply_rope

_SDPA_BACKENDS = {
    AttnBackend.cudnn: SDPBackend.CUDNN_ATTENTION,
    AttnBackend.flash: SDPBackend.FLASH_ATTENTION,
    AttnBackend.efficient: SDPBackend.EFFICIENT_ATTENTION,
    AttnBackend.math: SDPBackend.MATH,
}
# Kernels that need one head size for q, k and v (MLA's values are narrower: padded for them).
# cuDNN takes a narrower v as it is (MLA on H100: 6.6 ms unpadded vs 8.1 ms padded per layer,
# docs/performance.md); the memory-efficient kernel backs it up where cuDNN declines.
_SAME_HEAD_DIM = (AttnBackend.flash, AttnBackend.flash_attn)


def checked_backend(cfg: ModelConfig) -> AttnBackend:
    """model.attn_backend, after checking that the flash-attn package is there if it is named."""
    backend = AttnBackend(cfg.attn_backend)
    if backend == AttnBackend.flash_attn and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(FLASH_ATTN_MISSING)
    return backend


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttnBackend
) -> torch.Tensor:
    """Causal softmax(q k^T / sqrt(d_qk)) v of q [B, T, H, d_qk] over k [B, T, Hkv, d_qk] and
    v [B, T, Hkv, d_v], query head i reading KV head i // (H / Hkv) -> [B, T, H, d_v]."""
    d_v = v.shape[-1]
    pad = d_v < q.shape[-1] and backend in _SAME_HEAD_DIM
    if pad:  # zero value features change nothing; the scale still comes from d_qk
        v = F.pad(v, (0, q.shape[-1] - d_v))
    if backend == AttnBackend.flash_attn:
        from flash_attn import flash_attn_func  # GQA-native, takes the (B, T, heads, d) layout

        o = flash_attn_func(q, k, v, causal=True)
    else:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        gqa = k.shape[1] != q.shape[1]
        if gqa and backend == AttnBackend.efficient:
            # The memory-efficient kernel has no GQA support: give every query head its KV head.
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            gqa = False
        kernels = [_SDPA_BACKENDS[backend]] if backend != AttnBackend.auto else []
        if backend == AttnBackend.cudnn and d_v != q.shape[-1]:
            kernels.append(SDPBackend.EFFICIENT_ATTENTION)
        ctx = sdpa_kernel(kernels) if kernels else contextlib.nullcontext()
        with ctx:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        o = o.transpose(1, 2)  # (B, T, H, d)
    return o[..., :d_v] if pad else o


def project_with(proj: nn.Linear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T, ``weight`` being ``proj.weight`` as it is or with a KHA part folded in.
    Through the module where it can, so that a projection swapped for another implementation
    (FP8 training, training/fp8.py) computes both: its forward for its own weight, its
    ``forward_with_weight`` (if it has one) for a folded weight; else ``F.linear``."""
    if weight is proj.weight:
        return proj(x)
    forward_with_weight = getattr(proj, "forward_with_weight", None)
    return F.linear(x, weight) if forward_with_weight is None else forward_with_weight(x, weight)


def attention_activation_bytes(d_model: int, q: int, k: int, v: int, o: int) -> int:
    """Rough bf16 bytes autograd keeps per token for an attention whose query, key, value and
    output rows are q, k, v and o values wide: the projection input, the QK-norm inputs (with
    their fp32 copies) and the q/k/v/out tensors the fused kernel saves."""
    return 2 * d_model + 6 * (q + k) + 2 * (q + k + v + o)


class Attention(nn.Module):
    """MHA / GQA / MQA (model.attention=gqa); KV cache 2 * H_kv * d values per token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.rope_dim = cfg.head_dim
        self.kv_cache_elems = 2 * cfg.num_kv_heads * cfg.head_dim
        self.backend = checked_backend(cfg)
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        self.kha_q, self.kha_k, self.kha_v = build_kha_targets(
            cfg.kha.variant, cfg.kha.targets, cfg.head_dim
        )
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        # The output is linear in each head's values, so T^V's linear last part (KHA-MLP's
        # W_down) is applied inside W^O. Subclasses whose heads' outputs pass a nonlinearity
        # before W^O turn this off.
        self.kha_v_into_output = qkv_transforms(self)[2].folds_into_output

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        if cache is not None:
            return self.forward_cached(x, rope, cache)
        q, k, v = self.project(x)  # x W^Q, x W^K, x W^V
        q, k, v = self.knock(q, k, v)  # T^Q(q), T^K(k), T^V(v)
        q, k = self.norm_and_rotate(q, k, rope)
        o = self.merge_heads(self._attend(q, k, v))  # (B, T, H * d)
        return self.project_out(o)  # o W^O

    def forward_cached(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: LayerCache
    ) -> torch.Tensor:
        """Inference: the T new tokens x [B, T, D] over the cache (kv_cache.py); rope holds the
        tables of all S positions, the new tokens being the last T. Caches k, v after RoPE."""
        T = x.shape[1]
        q, k, v = self.knock(*self.project(x))
        cos, sin = rope
        q, k = self.norm_and_rotate(q, k, (cos[-T:], sin[-T:]))
        k, v = cache.update(k, v)  # (B, S, Hkv, d) each
        o = self.merge_heads(self._attend_cached(q, k, v, cache.mask))  # (B, T, H * d)
        return self.project_out(o)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v heads of x [B, T, D], KHA-Linear already applied (folded into the weights)."""
        B, T, _ = x.shape
        t_q, t_k, t_v = qkv_transforms(self)
        q = project_with(self.q_proj, x, t_q.fold_into_projection(self.q_proj.weight))
        k = project_with(self.k_proj, x, t_k.fold_into_projection(self.k_proj.weight))
        v = project_with(self.v_proj, x, t_v.fold_into_projection(self.v_proj.weight))
        q = q.view(B, T, self.num_heads, self.head_dim)  # (B, T, H, d)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, Hkv, d)
        v = v.view(B, T, -1, self.head_dim)  # (B, T, Hkv, d)
        return q, k, v

    def knock(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the knocking-heads transforms do on the heads, after the parts folded into the
        projections (:meth:`project`) and into W^O (:meth:`project_out`). Identity at init."""
        t_q, t_k, t_v = qkv_transforms(self)
        v = t_v.on_activations(v, output_folded=self.kha_v_into_output)
        return t_q.on_activations(q), t_k.on_activations(k), v

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """o W^O for o [B, T, H * d], with T^V's linear last part folded into W^O [D, H * d]
        where :meth:`knock` left it out."""
        if not self.kha_v_into_output:
            return self.o_proj(o)
        folded = qkv_transforms(self)[2].fold_into_output(self.o_proj.weight)
        return project_with(self.o_proj, o, folded)

    def norm_and_rotate(
        self, q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [B, T, H, d] over k, v [B, T, Hkv, d] -> [B, T, H, d]."""
        return causal_attention(q, k, v, self.backend)

    def _attend_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention of new queries q [B, T, H, d] over cached k, v [B, S, Hkv, d] under mask
        (B, 1, T, S) -> [B, T, H, d]."""
        return masked_attention(q, k, v, mask)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        B, T = o.shape[:2]
        return o.reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H * d)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token beyond 6 x parameters: q k^T and the weighted sum of v over
        seq_len keys, forward and backward (torchtitan's 12 H d T; no causal discount)."""
        return 6 * self.num_heads * (self.head_dim + self.head_dim) * seq_len

    def activation_bytes_per_token(self, d_model: int, seq_len: int) -> int:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return attention_activation_bytes(d_model, q, kv, kv, q)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            trunc_normal_(proj.weight, std)
        trunc_normal_(self.o_proj.weight, out_std)
        for m in (self.kha_q, self.kha_k, self.kha_v, self.q_norm, self.k_norm):
            if m is not None:
                m.reset_parameters()
