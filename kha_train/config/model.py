"""The ``model`` section: the architecture (attention, KHA, MoE) and its enums."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class AttnBackend(enum.StrEnum):
    auto = "auto"  # let PyTorch pick (cuDNN is first on Hopper)
    cudnn = "cudnn"  # SDPA cuDNN backend: fastest on H100 (8.1 ms vs 14.0 ms for flash)
    flash = "flash"  # SDPA flash backend
    efficient = "efficient"  # SDPA memory-efficient backend (no native GQA: K/V are expanded)
    math = "math"  # SDPA reference math backend (CPU tests)
    flash_attn = "flash_attn"  # the optional flash-attn package (pip install kha-train[flash])


class AttentionKind(enum.StrEnum):
    gqa = "gqa"  # MHA / GQA / MQA: set by num_kv_heads (= num_heads, divisor, 1)
    gta = "gta"  # grouped-tied: one KV projection per KV head (V = KV), one shared RoPE key
    mla = "mla"  # DeepSeek-V2 latent attention (model.mla); KHA-Linear only, qk_norm off
    mea = "mea"  # GQA + head-level composition of K/V across KV heads + head norm (model.mea)
    talking_heads = "talking_heads"  # GQA + H x H logit/weight mixing; materialised map, slow


class KHAVariant(enum.StrEnum):
    none = "none"  # plain attention
    linear = "linear"  # shared d_head x d_head matrix T per target (absorbable at inference)
    mlp = "mlp"  # 2 * (x W_up * sigmoid(x W_gate)) W_down per target; the paper uses V only
    gate = "gate"  # x * 2 sigmoid(x W_gate): the paper's ablation (hurts, Table 2)


class ScoreFunc(enum.StrEnum):
    softmax = "softmax"
    sigmoid = "sigmoid"


class Balancing(enum.StrEnum):
    none = "none"  # no balancing
    loss_free_sign = "loss_free_sign"  # b <- b - u * sign(F - 1/E)            (Wang et al. 2024)
    loss_free_rms = "loss_free_rms"  # b <- b - u * (F - 1/E) / RMS(F - 1/E)   (Su 2025; paper)
    aux_loss = "aux_loss"  # Switch-style auxiliary loss, coefficient aux_loss_coef


@dataclass
class MoEConfig:
    num_experts: int = 0  # routed experts; 0 makes every layer a dense SwiGLU FFN
    top_k: int = 0  # experts chosen per token
    expert_ffn_size: int = 0  # hidden size of each SwiGLU expert
    num_shared_experts: int = 0  # always-on experts of expert_ffn_size each (Qwen3: 0)
    first_k_dense: int = 0  # the first k layers use the dense FFN (model.ffn_size)
    moe_every_n: int = 1  # layer i (0-based) is MoE iff (i + 1) % moe_every_n == 0, after first_k
    score_func: ScoreFunc = ScoreFunc.softmax  # router score; softmax over experts in fp32
    norm_topk_prob: bool = True  # renormalise the top-k gate weights to sum to 1
    balancing: Balancing = Balancing.loss_free_rms
    bias_update_rate: float = 1e-3  # u in the loss-free rules, applied once per optimizer step
    aux_loss_coef: float = 1e-2  # weight of the Switch aux loss when balancing=aux_loss

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (0-based) uses the routed MoE FFN."""
        if self.num_experts == 0 or layer_idx < self.first_k_dense:
            return False
        return (layer_idx + 1) % self.moe_every_n == 0


@dataclass
class KHAConfig:
    variant: KHAVariant = KHAVariant.none
    # Which projections get a shared head transform: any of q, k, v. The paper's main setting is
    # mlp on [v]; gate is only defined on v.
    targets: list[str] = field(default_factory=lambda: ["v"])


@dataclass
class MLAConfig:
    """Multi-head latent attention (model.attention=mla). Content (no RoPE) part of each query /
    key head and each value head: model.head_dim; the cache holds kv_lora_rank + rope_head_dim."""

    kv_lora_rank: int = 512  # latent c_kv each token caches; K and V heads are up-projected from it
    q_lora_rank: int = 1024  # query latent size; 0: queries are projected from x directly
    rope_head_dim: int = 64  # decoupled RoPE part of q and k; the key's is one head shared by all


@dataclass
class MEAConfig:
    """Explicit multi-head attention (model.attention=mea, Peng et al. 2026)."""

    # KV heads projected (and cached); the HLC matrices expand them to model.num_kv_heads.
    # 0: as many as num_kv_heads (HLC is then a square mixing); fewer: MEA's "virtual heads".
    cached_kv_heads: int = 0
    head_norm: bool = True  # RMSNorm over d_head on each head's attention output before W^O


@dataclass
class ModelConfig:
    vocab_size: int = 151936  # embedding rows; >= the tokenizer's vocab (padding is allowed)
    hidden_size: int = 1152
    num_layers: int = 12
    num_heads: int = 32  # query heads
    num_kv_heads: int = 4  # key/value heads: num_heads -> MHA, 1 -> MQA, else GQA
    head_dim: int = 128
    ffn_size: int = 3072  # dense SwiGLU hidden size (dense models and dense layers of MoEs)
    tie_embeddings: bool = True  # LM head shares the input embedding matrix
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True  # per-head RMSNorm on q and k before RoPE (Qwen3)
    init_std: float = 0.02  # std of the normal init; output projections are scaled by depth
    attention: AttentionKind = AttentionKind.gqa
    attn_backend: AttnBackend = AttnBackend.auto
    moe: MoEConfig = field(default_factory=MoEConfig)
    kha: KHAConfig = field(default_factory=KHAConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)  # read only when attention=mla
    mea: MEAConfig = field(default_factory=MEAConfig)  # read only when attention=mea
