"""The decoder-only transformer: embeddings, pre-norm blocks (attention + dense or MoE FFN),
final norm, LM head (tied to the embeddings or not), and the chunked training loss.

    h_0     = Embed(tokens)
    a_l     = h_{l-1} + Attention(RMSNorm(h_{l-1}))   Attention: per model.attention
    h_l     = a_l + FFN_l(RMSNorm(a_l))               FFN_l: SwiGLU or MoE (MoEConfig.is_moe_layer)
    logits  = RMSNorm(h_L) W_head^T                   W_head = W_embed when tied

Parallelism, activation checkpointing and compilation are applied from outside (the trainer
wraps each element of ``layers``); the model holds only modules.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kha_train.config import AttentionKind, Balancing, ModelConfig
from kha_train.model.attention import Attention
from kha_train.model.attn_gta import GroupedTiedAttention
from kha_train.model.attn_mea import ExplicitAttention
from kha_train.model.attn_mla import LatentAttention
from kha_train.model.attn_talking import TalkingHeadsAttention
from kha_train.model.ffn import SwiGLU
from kha_train.model.init import trunc_normal_
from kha_train.model.kv_cache import KVCache, LayerCache
from kha_train.model.loss import (
    DEFAULT_CHUNK_TOKENS,
    IGNORE_INDEX,
    chunked_token_nll,
    lm_head_loss,
)
from kha_train.model.moe.layer import MoELayer
from kha_train.model.norms import RMSNorm
from kha_train.model.rope import RotaryEmbedding

AnyAttention = (
    Attention | GroupedTiedAttention | LatentAttention | ExplicitAttention | TalkingHeadsAttention
)


def build_attention(cfg: ModelConfig) -> AnyAttention:
    """The attention module model.attention names (the one place the variant is chosen)."""
    match AttentionKind(cfg.attention):
        case AttentionKind.gqa:
            return Attention(cfg)
        case AttentionKind.gta:
            return GroupedTiedAttention(cfg)
        case AttentionKind.mla:
            return LatentAttention(cfg)
        case AttentionKind.mea:
            return ExplicitAttention(cfg)
        case AttentionKind.talking_heads:
            return TalkingHeadsAttention(cfg)
    raise ValueError(
        f"unknown model.attention {cfg.attention!r}: use gqa, gta, mla, mea or talking_heads"
    )


class Block(nn.Module):
    """One pre-norm residual block: attention, then a dense SwiGLU or a routed MoE FFN."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = cfg.moe.is_moe_layer(layer_idx)
        self.ffn: SwiGLU | MoELayer = (
            MoELayer(cfg.hidden_size, cfg.moe)
            if self.is_moe
            else SwiGLU(cfg.hidden_size, cfg.ffn_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        if cache is None:
            x = x + self.attn(self.attn_norm(x), rope)
        else:  # inference over a KV cache (kv_cache.py)
            x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.ffn(self.ffn_norm(x))

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attn.reset_parameters(std, out_std)
        self.ffn.reset_parameters(std, out_std)


class Transformer(nn.Module):
    """Qwen3-style (MoE) decoder with knocking-heads attention. Build, then ``init_weights()``.

    ``forward(input_ids [B, T], labels [B, T] | None)`` returns logits [B, T, V] without labels,
    else the scalar training loss: mean next-token cross entropy (fp32) over labels != IGNORE_INDEX,
    plus the Switch aux loss when model.moe.balancing=aux_loss (also kept, detached, in
    ``last_aux_loss`` for logging). ``labels[t]`` is the target of position t (already shifted).
    With ``reduction="none"`` (evaluation) it returns each position's NLL [B, T] instead, fp32,
    0 where labels == IGNORE_INDEX; no aux loss and no gradient. It is a forward argument, not a
    method, so that FSDP2's forward hooks gather the sharded weights.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Tokens per chunk of the LM head + loss (see loss.py): bounds the logits held at once.
        self.loss_chunk_tokens = DEFAULT_CHUNK_TOKENS
        # On CUDA, compile each chunk's loss + gradient (loss.py); off: eager (for debugging, or
        # where Inductor is unavailable). Set by the trainer's build_model from its arguments.
        self.compile_loss = True
        self.loss_kernel = "chunked"  # parallel.loss_kernel (model/loss_kernels.py)
        layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # The attention variant decides how many features of a head RoPE rotates: all of them,
        # or the decoupled RoPE part (half a head for GTA, model.mla.rope_head_dim for MLA).
        self.rope = RotaryEmbedding(layers[0].attn.rope_dim, cfg.rope_theta)
        self.layers = layers
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        # Tied: the head is the embedding matrix itself (one parameter, no second module), which
        # keeps tying intact through meta-device build, to_empty and FSDP sharding.
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.last_aux_loss: torch.Tensor | None = None

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head matrix [V, D]."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer in place (after ``to_empty`` on a meta build).

        Seed with ``torch.manual_seed`` first for a reproducible model. With std = init_std and
        out_std = init_std / sqrt(2 * num_layers) (GPT-2: two residual writes per block):

        ================================================  =====================================
        tensor                                             initial value
        ================================================  =====================================
        embed_tokens.weight (also the head when tied)      N(0, std), truncated at 3 std
        lm_head.weight (untied)                            N(0, std), truncated at 3 std
        attn.{q,k,v}_proj, ffn.{gate,up}_proj              N(0, std), truncated at 3 std
        attn.o_proj, ffn.down_proj                         N(0, out_std), truncated at 3 std
        experts.w_gate_up_E2FD                             N(0, std), truncated at 3 std
        experts.w_down_EDF                                 N(0, out_std), truncated at 3 std
        shared_experts (gate/up, down)                     as the dense FFN
        router.weight                                      N(0, std), truncated at 3 std
        router.expert_bias, expert_counts (buffers)        0
        all RMSNorm weights (block, q/k, final)            1
        kha_{q,k,v}.weight (linear T)                      I
        kha_v.w_up, kha_v.w_down (mlp)                     I
        kha_v.w_gate (mlp, gate)                           0  (2 sigmoid(0) = 1)
        gta: kv_proj, k_rope_proj                          N(0, std), truncated at 3 std
        mla: q_down, q_up, kv_down, kv_up                  N(0, std), truncated at 3 std
        mla: q_latent_norm, kv_latent_norm                 1
        mea: hlc_k, hlc_v                                  I (cached = KV heads), else one-hot
                                                           replication (GQA grouping)
        mea: head_norm.weight                              1
        talking_heads: logit_mix, weight_mix               I
        rope.inv_freq (buffer)                             rope_theta^(-2j / head_dim)
        ================================================  =====================================

        KHA therefore starts as the exact identity: the model computes the same function as the
        one without KHA with the same other weights (in every attention variant); so do MEA's
        HLC (with head norm off) and the talking-heads mixes, relative to GQA.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        trunc_normal_(self.embed_tokens.weight, std)
        self.rope.reset_parameters()
        for block in self.layers:
            block.reset_parameters(std, out_std)
        self.norm.reset_parameters()
        if self.lm_head is not None:
            trunc_normal_(self.lm_head.weight, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        if cache is not None:  # inference only: no loss over a cache
            if labels is not None:
                raise ValueError("forward with a KV cache computes logits: pass no labels")
            return self.forward_cached(input_ids, cache, attention_mask)
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        B, T = input_ids.shape
        h = self.embed_tokens(input_ids)  # (B, T, D)
        rope = self.rope(T)  # cos, sin: (T, rope_dim/2) each
        for block in self.layers:
            h = block(h, rope)
        h = self.norm(h)
        if labels is None:
            return h @ self.head_weight.to(h.dtype).T  # (B, T, V)
        if reduction == "none":  # evaluation: each position's NLL, no aux loss, no gradient
            nll = chunked_token_nll(
                h.reshape(B * T, -1), self.head_weight, labels.reshape(B * T),
                self.loss_chunk_tokens, IGNORE_INDEX,
            )  # fmt: skip
            return nll.view(B, T)  # (B, T) fp32, 0 where labels == IGNORE_INDEX
        loss = lm_head_loss(
            h.reshape(B * T, -1),
            self.head_weight,
            labels.reshape(B * T),
            self.loss_chunk_tokens,
            IGNORE_INDEX,
            self.compile_loss,
            self.loss_kernel,
        )
        return loss + self._aux_loss(loss)

    @torch.no_grad()
    def forward_cached(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inference: logits [B, T, V] of the new tokens input_ids [B, T] at the absolute
        positions cache.length .. cache.length + T - 1, appending them to ``cache`` (see
        kv_cache.py). attention_mask [B, T]: 1 for real tokens, 0 for (left) padding."""
        valid = (
            torch.ones_like(input_ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.to(torch.bool)
        )
        cache.begin(valid)
        rope = self.rope(cache.length)  # cos, sin of all S positions: (S, rope_dim/2) each
        h = self.embed_tokens(input_ids)  # (B, T, D)
        for i, block in enumerate(self.layers):
            h = block(h, rope, cache.layer(i))
        h = self.norm(h)
        return h @ self.head_weight.to(h.dtype).T  # (B, T, V)

    def new_cache(self) -> KVCache:
        """An empty KV cache for :meth:`forward_cached`."""
        return KVCache(len(self.layers))

    def _aux_loss(self, like: torch.Tensor) -> torch.Tensor | float:
        """Sum of the MoE layers' aux losses from this forward (0 unless balancing=aux_loss)."""
        if self.cfg.moe.num_experts == 0 or Balancing(self.cfg.moe.balancing) != Balancing.aux_loss:
            return 0.0
        # modules() also finds layers inside the trainer's wrappers (checkpoint, compile).
        losses = [m.take_aux_loss() for m in self.modules() if isinstance(m, MoELayer)]
        total = sum((x for x in losses if x is not None), torch.zeros((), device=like.device))
        self.last_aux_loss = total.detach()
        return total
