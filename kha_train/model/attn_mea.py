"""Multi-head explicit attention (MEA; Peng et al. 2026, "Explicit Multi-head Attention for
Inter-head Interaction in Large Language Models", arXiv 2601.19611) on top of GQA and KHA.

Two additions to :class:`~kha_train.model.attention.Attention` (h_c = model.mea.cached_kv_heads,
h = model.num_kv_heads):

    k_c, v_c = x W^K, x W^V                        [B, T, h_c, d]   (what a KV cache holds)
    k[:, i]  = sum_j W^K_lc[j, i] k_c[:, j]        [B, T, h, d]     Head-level Linear Composition
    v[:, i]  = sum_j W^V_lc[j, i] v_c[:, j]                         (HLC), shared over positions
                                                                    and features
    ... then KHA, QK-norm, RoPE and causal attention exactly as GQA ...
    o_i      = RMSNorm_d(o_i) * g_i                head-level norm of each head's output (one
    out      = concat(o) W^O                       weight per head and feature: GroupNorm-like)

W_lc starts as the identity when h_c = h (then MEA with model.mea.head_norm=false is exactly the
GQA model with the same weights), and as GQA-style replication of the cached heads when h_c < h.

HLC sits directly on the projection outputs, before KHA and the QK-norm. That placement keeps
K and V linear in x up to the HLC, so (a) in training HLC folds into W^K / W^V (one GEMM for the
h composed heads, :func:`fold_hlc`), (b) the virtual-heads conversion (virtual_heads.py: an SVD
of the stacked projection over the head axis) is exact at full rank even with a nonlinear
KHA-MLP or the QK-norm after it, and (c) KHA-Linear commutes with it and still folds into W^K /
W^V. The price at inference: with qk_norm on, a decoder caches the h_c pre-norm heads and
expands and normalises them for each step (cost linear in cached tokens, like the attention
itself); the KV cache is 2 * h_c * d values per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kha_train.config import ModelConfig
from kha_train.model.attention import Attention, project_with
from kha_train.model.init import copy_full_
from kha_train.model.kha import qkv_transforms
from kha_train.model.kv_cache import LayerCache
from kha_train.model.rope import apply_rope


def fold_hlc(hlc: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The h heads' projection [h * d, D] from the h_c cached heads' rows ``weight``
    [h_c * d, D] and HLC [h_c, h]: head i's rows are sum_j hlc[j, i] W_c[j]."""
    w = weight.view(hlc.shape[0], head_dim, weight.shape[-1])  # (h_c, d, D)
    return torch.einsum("ji,jdD->idD", hlc.to(w.dtype), w).reshape(-1, w.shape[-1])


def hlc_init(n_cached: int, n_heads: int) -> torch.Tensor:
    """[n_cached, n_heads] with a one where cached head j feeds head i = j * n_heads / n_cached
    onwards: the identity if n_cached = n_heads, else each cached head copied to a contiguous
    group of heads (GQA's grouping)."""
    owner = torch.arange(n_heads) * n_cached // n_heads  # cached head feeding each head
    return F.one_hot(owner, n_cached).T.float()


class HeadRMSNorm(nn.Module):
    """RMSNorm over d of every head of o [B, T, H, d], weight [H, d] (GroupNorm with H groups,
    RMS statistics). Computed in fp32, cast back to the input dtype."""

    def __init__(self, num_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim))

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(o.float(), (o.shape[-1],), eps=self.eps) * self.weight.float()
        return y.to(o.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class ExplicitAttention(Attention):
    """MEA (model.attention=mea); KV cache 2 * cached_kv_heads * d values per token."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.num_cached_heads = cfg.mea.cached_kv_heads or cfg.num_kv_heads
        self.kv_cache_elems = 2 * self.num_cached_heads * cfg.head_dim
        # Only the cached heads are projected (GQA's k_proj / v_proj, narrower when h_c < h).
        cached_dim = self.num_cached_heads * cfg.head_dim
        self.k_proj = nn.Linear(cfg.hidden_size, cached_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cached_dim, bias=False)
        self.hlc_k = nn.Parameter(torch.empty(self.num_cached_heads, cfg.num_kv_heads))
        self.hlc_v = nn.Parameter(torch.empty(self.num_cached_heads, cfg.num_kv_heads))
        self.head_norm = (
            HeadRMSNorm(cfg.num_heads, cfg.head_dim, cfg.norm_eps) if cfg.mea.head_norm else None
        )
        # The head norm sits between attention and W^O: all of T^V stays on V then.
        self.kha_v_into_output = self.kha_v_into_output and self.head_norm is None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q and the h composed KV heads of x [B, T, D], HLC folded into W^K / W^V: head i's rows
        are sum_j W_lc[j, i] W_c[j], so one GEMM per projection gives the composed heads (the same
        function and gradients as :meth:`compose` after the projection, without its passes over
        the activations). KHA-Linear folds in as in GQA: it commutes with HLC."""
        B, T, _ = x.shape
        t_q, t_k, t_v = qkv_transforms(self)
        q = project_with(self.q_proj, x, t_q.fold_into_projection(self.q_proj.weight))
        w_k = fold_hlc(self.hlc_k, t_k.fold_into_projection(self.k_proj.weight), self.head_dim)
        w_v = fold_hlc(self.hlc_v, t_v.fold_into_projection(self.v_proj.weight), self.head_dim)
        k = project_with(self.k_proj, x, w_k).view(B, T, self.num_kv_heads, self.head_dim)
        v = project_with(self.v_proj, x, w_v).view(B, T, self.num_kv_heads, self.head_dim)
        return q.view(B, T, self.num_heads, self.head_dim), k, v

    def compose(self, k_c: torch.Tensor, v_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HLC on the activations (decoding from the cache of the h_c heads): the h KV heads from
        the h_c cached heads k_c, v_c [B, T, h_c, d]."""
        # Per position, [h, h_c] @ [h_c, d]: one broadcast batched matmul, contiguous output.
        k = torch.matmul(self.hlc_k.T.to(k_c.dtype), k_c)  # (B, T, h, d)
        v = torch.matmul(self.hlc_v.T.to(v_c.dtype), v_c)  # (B, T, h, d)
        return k, v

    def forward_cached(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: LayerCache
    ) -> torch.Tensor:
        """Inference (kv_cache.py): caches the h_c heads before HLC (2 h_c d values per token)
        and redoes HLC, KHA, QK-norm and RoPE for all S cached positions each step."""
        T = x.shape[1]
        q, k_c, v_c = Attention.project(self, x)  # k_c, v_c: (B, T, h_c, d)
        k_c, v_c = cache.update(k_c, v_c)  # (B, S, h_c, d) each
        q, k, v = self.knock(q, *self.compose(k_c, v_c))  # k, v: (B, S, h, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope  # (S, d/2) each
        q, k = apply_rope(q, cos[-T:], sin[-T:]), apply_rope(k, cos, sin)
        o = self.merge_heads(self._attend_cached(q, k, v, cache.mask))  # (B, T, H * d)
        return self.project_out(o)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        if self.head_norm is not None:
            o = self.head_norm(o)  # (B, T, H, d)
        return super().merge_heads(o)

    def flops_per_token(self, seq_len: int) -> int:
        """GQA's, plus the HLC matrices, applied to every one of the d features (6N counts
        each of their h_c * h entries once)."""
        hlc = 2 * self.num_cached_heads * self.num_kv_heads * (self.head_dim - 1)
        return super().flops_per_token(seq_len) + 6 * hlc

    def activation_bytes_per_token(self, d_model: int, seq_len: int) -> int:
        """GQA's (HLC is folded into the weights: no cached-head activations are kept), plus the
        head norm's input and its fp32 copy."""
        norm = 6 * self.num_heads * self.head_dim if self.head_norm is not None else 0
        return super().activation_bytes_per_token(d_model, seq_len) + norm

    def reset_parameters(self, std: float, out_std: float) -> None:
        super().reset_parameters(std, out_std)
        init = hlc_init(self.num_cached_heads, self.num_kv_heads)
        copy_full_(self.hlc_k, init)
        copy_full_(self.hlc_v, init)
        if self.head_norm is not None:
            self.head_norm.reset_parameters()
