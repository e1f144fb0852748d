"""Parameter, FLOP, KV-cache and memory accounting, computed from the config alone.

Parameter counts build the model on the meta device (no memory is allocated), so they always
agree with the modules actually trained. FLOPs follow torchtitan's MFU convention (NOTES.md
section 6):

    FLOPs/token = 6 * N + 12 * n_layers * n_heads * head_dim * seq_len

with N the *active* parameters excluding the input embedding (a tied table counts once, as the
LM head). The 6 is 2 (multiply-add) x 3 (forward, and backward for inputs and for weights); the
second term is attention's QK^T and AV over the full (not causally halved) sequence. Corrections
to 6N: a KHA matrix is applied to every head of its target, so it costs 6 * d_head^2 * heads
per token, not 6 * d_head^2; the extra uses are added (``KHA.flops_per_token`` of each target).
The attention term is each variant's own
(``flops_per_token`` of the module model.attention builds): 6 H (d_qk + d_v) T, i.e. 12 H d T
for GQA, GTA and MEA, with MLA's d_qk = head_dim + rope_head_dim, plus MEA's HLC and
talking heads' mixing of the T x T maps.
"""

from __future__ import annotations

import dataclasses

import torch

from kha_train.config import AttnBackend, ModelConfig
from kha_train.model.kha import qkv_transforms
from kha_train.model.loss import DEFAULT_CHUNK_TOKENS


def _meta_model(cfg: ModelConfig):
    from kha_train.model.transformer import Transformer

    # The attention backend changes no parameter; auto avoids needing flash-attn installed.
    cfg = dataclasses.replace(cfg, attn_backend=AttnBackend.auto)
    with torch.device("meta"):
        return Transformer(cfg)


def _meta_attention(cfg: ModelConfig):
    """One layer's attention module, built on the meta device (it accounts for itself)."""
    from kha_train.model.transformer import build_attention

    with torch.device("meta"):
        return build_attention(dataclasses.replace(cfg, attn_backend=AttnBackend.auto))


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters. Active counts top_k of the routed experts in each MoE layer
    (and everything else: embeddings, attention, router, shared experts, norms, KHA)."""
    from kha_train.model.moe.balance import moe_layers

    model = _meta_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in moe_layers(model):
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_experts
        inactive += (layer.num_experts - layer.top_k) * per_expert
    return total, total - inactive


def kha_params(cfg: ModelConfig) -> int:
    """Parameters of the KHA modules (all layers)."""
    model = _meta_model(cfg)
    return sum(p.numel() for n, p in model.named_parameters() if ".kha_" in n)


def _kha_flops_per_token(attn) -> int:
    """Training FLOPs per token of one attention module's KHA beyond 6 x its parameters: each
    matrix is applied to every head of its target (H query heads, H_kv key / value heads)."""
    t_q, t_k, t_v = qkv_transforms(attn)
    H, Hkv = attn.num_heads, attn.num_kv_heads
    return t_q.flops_per_token(H) + t_k.flops_per_token(Hkv) + t_v.flops_per_token(Hkv)


def _kha_activation_bytes_per_token(attn) -> int:
    """Rough bytes autograd keeps per token for one attention module's KHA."""
    t_q, t_k, t_v = qkv_transforms(attn)
    q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
    return (
        t_q.activation_bytes_per_token(q)
        + t_k.activation_bytes_per_token(kv)
        + t_v.activation_bytes_per_token(kv)
    )


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), torchtitan's convention (module docstring)."""
    _, active = param_counts(cfg)
    n = active if cfg.tie_embeddings else active - cfg.vocab_size * cfg.hidden_size
    attn = _meta_attention(cfg)
    per_layer = attn.flops_per_token(seq_len) + _kha_flops_per_token(attn)
    return float(6 * n + cfg.num_layers * per_layer)


def paper_layer_flops(L: int, d: int, n: int) -> dict[str, float]:
    """Training FLOPs of one layer from the KHA paper, section 3.4 (sequence length L, width d,
    n heads, d_ff = 3d): eq. 10 MHA = 8Ld^2 + 4L^2d, FFN = 18Ld^2, eq. 11 total = 26Ld^2 + 4L^2d,
    eq. 12 KHA = 6Ld^2/n; plus the KHA overhead as fractions of the layer and of attention."""
    mha = 8 * L * d**2 + 4 * L**2 * d
    ffn = 18 * L * d**2
    kha = 6 * L * d**2 / n
    total = mha + ffn
    return {
        "mha": float(mha),
        "ffn": float(ffn),
        "total": float(total),
        "kha": float(kha),
        "kha_vs_layer": kha / total,
        "kha_vs_mha": kha / mha,
    }


def kv_cache_elems_per_token_per_layer(cfg: ModelConfig) -> int:
    """Values cached per token and layer (the paper's Table 3 'Cache' column): 2 H_kv d for
    GQA / MQA / MHA and talking heads, H_kv d + d/2 for GTA, kv_lora_rank + rope_head_dim for
    MLA, 2 h_c d for MEA with h_c = model.mea.cached_kv_heads (or H_kv)."""
    return _meta_attention(cfg).kv_cache_elems


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_elem: int = 2) -> int:
    """Bytes of KV cache one token takes over all layers (bf16 by default)."""
    return cfg.num_layers * kv_cache_elems_per_token_per_layer(cfg) * bytes_per_elem


def _activation_bytes_per_token(cfg: ModelConfig, layer_idx: int, attn_bytes: int) -> int:
    """Rough bf16 activations autograd keeps per token for one block (no checkpointing);
    ``attn_bytes``: the attention module's (projection input, q/k/v/out, norms, maps, KHA)."""
    D = cfg.hidden_size
    norms = 2 * 6 * D  # two RMSNorms: bf16 input + fp32 copy
    if cfg.moe.is_moe_layer(layer_idx):
        K, F, E = cfg.moe.top_k, cfg.moe.expert_ffn_size, cfg.moe.num_experts
        ffn = 4 * D + 8 * E + 2 * (3 * K * D + 5 * K * F)  # router fp32, gathered rows, SwiGLU
        ffn += 2 * (D + 5 * cfg.moe.num_shared_experts * F)
    else:
        ffn = 2 * (D + 5 * cfg.ffn_size)
    return norms + attn_bytes + ffn


def _matmul_output_bytes_per_token(cfg: ModelConfig, layer_idx: int) -> int:
    """What selective activation checkpointing keeps of one block per token: its input and the
    outputs of its matrix products (q/k/v, the attention output and its softmax statistics,
    o; router logits in fp32, the experts' two GEMMs or the dense FFN's)."""
    D, H, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    attn = 2 * (H * d + 2 * cfg.num_kv_heads * d) + 2 * H * d + 4 * H + 2 * D
    if cfg.moe.is_moe_layer(layer_idx):
        K, F, E = cfg.moe.top_k, cfg.moe.expert_ffn_size, cfg.moe.num_experts
        S = cfg.moe.num_shared_experts
        ffn = 4 * E + 2 * (2 * K * F + K * D) + 2 * S * (2 * F + D)
    else:
        ffn = 2 * (2 * cfg.ffn_size + D)
    return 2 * D + attn + ffn


def train_memory_estimate(
    cfg: ModelConfig,
    micro_batch: int,
    seq_len: int,
    n_ranks: int = 1,
    activation_checkpointing: str = "none",
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ac_every_n: int = 2,
    reshard_after_forward: bool = True,
    single_device: bool = False,
    accumulates: bool = False,
) -> dict[str, float]:
    """A rough per-rank training memory estimate in bytes (expect +-30%), FSDP over n_ranks:
    fp32 weights, fp32 grads and AdamW moments sharded; bf16 copies of two gathered blocks
    (the current one and the prefetched next), or of every block when ``reshard_after_forward``
    is off (parallel.reshard_after_forward: the gathered weights are kept from each block's
    forward to its backward, as on one GPU by default); activations of one micro-batch; the LM head and
    loss (one chunk of logits, the stored head gradients). Activations by
    ``activation_checkpointing`` (parallel.activation_checkpointing): none, every block's;
    full, the block inputs plus one block being recomputed; every_n, that for every n-th block
    (``ac_every_n``) and all of the others'; selective, every block's matrix-product outputs
    plus one block's recomputed rest.

    ``single_device`` (parallel.single_device, one rank, no FSDP2): fp32 master weights and
    moments, the bf16 weights all resident, bf16 gradients, and with ``accumulates`` (several
    micro-batches per step) an fp32 gradient accumulator."""
    total, _ = param_counts(cfg)
    tokens = micro_batch * seq_len
    D, V = cfg.hidden_size, cfg.vocab_size
    attn = _meta_attention(cfg)
    attn_bytes = attn.activation_bytes_per_token(D, seq_len) + _kha_activation_bytes_per_token(attn)
    per_layer = [_activation_bytes_per_token(cfg, i, attn_bytes) for i in range(cfg.num_layers)]
    mode = str(activation_checkpointing)
    every = {"none": 0, "full": 1, "every_n": ac_every_n}.get(mode)
    if mode == "selective":
        kept = [_matmul_output_bytes_per_token(cfg, i) for i in range(cfg.num_layers)]
        recompute = max(a - k for a, k in zip(per_layer, kept, strict=True))
        acts = tokens * (sum(kept) + max(recompute, 0))
    elif every is None:
        raise ValueError(f"activation_checkpointing={mode!r}: none, full, every_n or selective")
    else:
        wrapped = [every > 0 and i % every == 0 for i in range(cfg.num_layers)]
        kept = [2 * D if w else a for w, a in zip(wrapped, per_layer, strict=True)]
        peak = max((a for w, a in zip(wrapped, per_layer, strict=True) if w), default=0)
        acts = tokens * (sum(kept) + peak)
    block_params = (total - V * D * (1 if cfg.tie_embeddings else 2)) / cfg.num_layers
    head = tokens * 2 * D * 2 + V * D * (4 + 2) + min(tokens, loss_chunk_tokens) * V * (2 + 4)
    out = {
        "weights": 4 * total / n_ranks,
        "grads": 4 * total / n_ranks,
        "optimizer": 8 * total / n_ranks,
        "gathered_params": 2 * (2 if reshard_after_forward else cfg.num_layers) * block_params
        + (2 * V * D if n_ranks > 1 else 0),
        "activations": float(acts),
        "head_and_loss": float(head),
    }
    if single_device:
        out["grads"] = (2 + (4 if accumulates else 0)) * total
        out["gathered_params"] = 2 * total  # the bf16 weights, every one resident
    out["total"] = sum(out.values())
    return out
