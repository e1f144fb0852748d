"""A kha_train model as a transformers causal LM (``trust_remote_code=True``).

Written by ``kha-train export`` into every export that no stock transformers class holds exactly
(KHA-MLP / gate, a non-zero loss-free router bias, shared experts, sigmoid router scores, GTA,
MLA, MEA, talking heads, no QK-norm). Imports only torch and transformers. Parameter names are
kha_train's own (``model.`` + the kha_train state-dict key), so the export is the trained state
dict as it is; the computation is kha_train's, written out plainly (no folding, no fused kernels):

    h_0    = Embed(tokens)
    a_l    = h_{l-1} + Attention(RMSNorm(h_{l-1}))     gqa / gta / mla / mea / talking_heads
    h_l    = a_l + FFN_l(RMSNorm(a_l))                 SwiGLU, or MoE on the layers kha_train uses
    logits = RMSNorm(h_L) W_head^T                      W_head = W_embed when tied

Attention: q, k, v projections, knocking heads T^Q, T^K, T^V on the heads (linear: x T;
mlp: 2 ((x W_up) * sigmoid(x W_gate)) W_down; gate: x * 2 sigmoid(x W_gate)), per-head RMSNorm
of q and k (QK-norm), half-split RoPE, causal softmax attention with KV heads shared by groups.
MoE router: fp32 logits, softmax or sigmoid scores s, experts chosen by top-k of s + b (b: the
loss-free balancing bias, selection only), gates g = s[chosen] (renormalised to sum 1 when
norm_topk_prob), output sum_k g_k expert_k(x) + shared experts.

Generation uses transformers' DynamicCache: each layer caches its keys and values after KHA,
QK-norm and RoPE (all per token), which gives the same result as recomputing the sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_kha import KhaConfig


class KhaRMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension, in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.dim,), self.weight.float(), self.eps).to(x.dtype)


class KhaSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- knocking heads: one d x d transform shared by all heads of a target ----------------------


class KhaLinear(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, heads, d)
        return x @ self.weight.to(x.dtype)


class KhaMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w_up = nn.Parameter(torch.eye(d))
        self.w_gate = nn.Parameter(torch.zeros(d, d))
        self.w_down = nn.Parameter(torch.eye(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = x @ self.w_up.to(x.dtype), x @ self.w_gate.to(x.dtype)
        return (2 * (up * torch.sigmoid(gate))) @ self.w_down.to(x.dtype)


class KhaGate(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2 * torch.sigmoid(x @ self.w_gate.to(x.dtype)))


_KHA = {"linear": KhaLinear, "mlp": KhaMLP, "gate": KhaGate}


def _kha_targets(config: KhaConfig, d: int) -> tuple:
    variant = str(config.kha.get("variant", "none"))
    targets = config.kha.get("targets", [])
    if variant == "none":
        return None, None, None
    return tuple(_KHA[variant](d) if t in targets else None for t in "qkv")


def _apply(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if module is None else module(x)


# ---- RoPE (half-split) ------------------------------------------------------------------------


def rope_tables(
    position_ids: torch.Tensor, rope_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rope_dim / 2] (fp32) for positions [B, T]."""
    exponent = torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim
    inv_freq = (1.0 / theta**exponent).to(torch.float32).to(position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # (B, T, r/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, r] by tables [B, T, r / 2], in fp32."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _rotate_last(x: torch.Tensor, r: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    nope, rot = x.split((x.shape[-1] - r, r), dim=-1)
    return torch.cat((nope, apply_rope(rot, cos, sin)), dim=-1)


# ---- attention --------------------------------------------------------------------------------


def _cached(cache, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
    """Keys and values [B, T, heads, d] of this step -> all of them so far [B, heads, S, d]."""
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, layer_idx)
    return k, v


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [B, T, H, d] against k [B, Hkv, S, d] -> fp32 logits [B, H, T, S] / sqrt(d)."""
    q = q.transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5


def _weighted(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights [B, H, T, S] times v [B, Hkv, S, dv] -> [B, T, H, dv]."""
    v = v.repeat_interleave(w.shape[1] // v.shape[1], dim=1)
    return (w.to(v.dtype) @ v).transpose(1, 2)


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~mask, torch.finfo(logits.dtype).min).softmax(dim=-1)


class KhaAttention(nn.Module):
    """GQA (attention=gqa) with KHA and QK-norm; the base of MEA and talking heads."""

    def __init__(self, config: KhaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        D, H, Hkv, d = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d
        self.rope_dim, self.theta = d, config.rope_theta
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.kha_q, self.kha_k, self.kha_v = _kha_targets(config, d)
        eps = config.rms_norm_eps
        self.q_norm = KhaRMSNorm(d, eps) if config.qk_norm else None
        self.k_norm = KhaRMSNorm(d, eps) if config.qk_norm else None

    def project(self, x: torch.Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        return q, k, v

    def attend(self, q, k, v, mask):
        return _weighted(_masked_softmax(_scores(q, k), mask), v)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        return o.reshape(*o.shape[:2], -1)

    def forward(self, x, cos, sin, mask, cache=None):
        q, k, v = self.project(x)
        q, k, v = _apply(self.kha_q, q), _apply(self.kha_k, k), _apply(self.kha_v, v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = _cached(cache, self.layer_idx, k, v)
        return self.o_proj(self.merge(self.attend(q, k, v, mask)))


class KhaExplicitAttention(KhaAttention):
    """MEA (attention=mea): head-level linear composition of the cached K / V heads, and an
    RMSNorm of each head's output (head_norm)."""

    def __init__(self, config: KhaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        D, d = config.hidden_size, config.head_dim
        hc = config.mea.get("cached_kv_heads", 0) or config.num_key_value_heads
        self.k_proj = nn.Linear(D, hc * d, bias=False)
        self.v_proj = nn.Linear(D, hc * d, bias=False)
        self.hlc_k = nn.Parameter(torch.zeros(hc, config.num_key_value_heads))
        self.hlc_v = nn.Parameter(torch.zeros(hc, config.num_key_value_heads))
        self.head_norm = (
            KhaHeadRMSNorm(config.num_attention_heads, d, config.rms_norm_eps)
            if config.mea.get("head_norm", True)
            else None
        )

    def project(self, x: torch.Tensor):
        q, k, v = super().project(x)
        k = torch.matmul(self.hlc_k.T.to(k.dtype), k)
        v = torch.matmul(self.hlc_v.T.to(v.dtype), v)
        return q, k, v

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        return super().merge(o if self.head_norm is None else self.head_norm(o))


class KhaHeadRMSNorm(nn.Module):
    def __init__(self, heads: int, d: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, d))

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(o.float(), (o.shape[-1],), eps=self.eps) * self.weight.float()
        return y.to(o.dtype)


class KhaTalkingHeadsAttention(KhaAttention):
    """Talking heads (attention=talking_heads): logits and weights mixed across heads."""

    def __init__(self, config: KhaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        H = config.num_attention_heads
        self.logit_mix = nn.Parameter(torch.eye(H))
        self.weight_mix = nn.Parameter(torch.eye(H))

    def attend(self, q, k, v, mask):
        logits = torch.einsum("bhts,hi->bits", _scores(q, k), self.logit_mix.float())
        w = _masked_softmax(logits, mask).to(v.dtype)
        w = torch.einsum("bhts,hi->bits", w, self.weight_mix.to(w.dtype))
        return _weighted(w, v)


class KhaGroupedTiedAttention(nn.Module):
    """GTA (attention=gta): tied K/V projection, one shared RoPE key head of d / 2 features."""

    def __init__(self, config: KhaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        D, H, Hkv, d = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, d
        self.rope_dim = d // 2
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.kv_proj = nn.Linear(D, Hkv * d, bias=False)
        self.k_rope_proj = nn.Linear(D, self.rope_dim, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.kha_q, self.kha_k, self.kha_v = _kha_targets(config, d)
        eps = config.rms_norm_eps
        self.q_norm = KhaRMSNorm(d, eps) if config.qk_norm else None
        self.k_norm = KhaRMSNorm(d, eps) if config.qk_norm else None

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        H, Hkv, d, r = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dim
        q = self.q_proj(x).view(B, T, H, d)
        kv = self.kv_proj(x).view(B, T, Hkv, d)
        k_r = self.k_rope_proj(x).view(B, T, 1, r).expand(B, T, Hkv, r)
        k = torch.cat((kv[..., : d - r], k_r), dim=-1)
        q, k, v = _apply(self.kha_q, q), _apply(self.kha_k, k), _apply(self.kha_v, kv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate_last(q, r, cos, sin), _rotate_last(k, r, cos, sin)
        k, v = _cached(cache, self.layer_idx, k, v)
        o = _weighted(_masked_softmax(_scores(q, k), mask), v)
        return self.o_proj(o.reshape(B, T, H * d))


class KhaLatentAttention(nn.Module):
    """MLA (attention=mla): K and V up-projected from a normalised latent; decoupled RoPE key
    shared by all heads. (The cache here holds the up-projected keys and values.)"""

    def __init__(self, config: KhaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        mla = config.mla
        D, H, Hkv, n = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        r, c, cq = mla["rope_head_dim"], mla["kv_lora_rank"], mla.get("q_lora_rank", 0)
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, n
        self.rope_dim, self.kv_lora_rank = r, c
        eps = config.rms_norm_eps
        if cq > 0:
            self.q_down = nn.Linear(D, cq, bias=False)
            self.q_latent_norm = KhaRMSNorm(cq, eps)
            self.q_up = nn.Linear(cq, H * (n + r), bias=False)
        else:
            self.q_down, self.q_latent_norm = None, None
            self.q_up = nn.Linear(D, H * (n + r), bias=False)
        self.kv_down = nn.Linear(D, c + r, bias=False)
        self.kv_latent_norm = KhaRMSNorm(c, eps)
        self.kv_up = nn.Linear(c, Hkv * 2 * n, bias=False)
        self.o_proj = nn.Linear(H * n, D, bias=False)
        self.kha_q, self.kha_k, self.kha_v = _kha_targets(config, n)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        H, Hkv, n, r = self.num_heads, self.num_kv_heads, self.head_dim, self.rope_dim
        c_q = x if self.q_down is None else self.q_latent_norm(self.q_down(x))
        q_n, q_r = self.q_up(c_q).view(B, T, H, n + r).split((n, r), dim=-1)
        c_kv, k_r = self.kv_down(x).split((self.kv_lora_rank, r), dim=-1)
        kv = self.kv_up(self.kv_latent_norm(c_kv)).view(B, T, Hkv, 2 * n)
        k_n, v = kv.split((n, n), dim=-1)
        q_n, k_n, v = _apply(self.kha_q, q_n), _apply(self.kha_k, k_n), _apply(self.kha_v, v)
        q_r = apply_rope(q_r, cos, sin)
        k_r = apply_rope(k_r.reshape(B, T, 1, r), cos, sin).expand(B, T, Hkv, r)
        q = torch.cat((q_n, q_r), dim=-1)
        k = torch.cat((k_n, k_r), dim=-1)
        k, v = _cached(cache, self.layer_idx, k, v.contiguous())
        o = _weighted(_masked_softmax(_scores(q, k), mask), v)
        return self.o_proj(o.reshape(B, T, H * n))


_ATTENTION = {
    "gqa": KhaAttention,
    "gta": KhaGroupedTiedAttention,
    "mla": KhaLatentAttention,
    "mea": KhaExplicitAttention,
    "talking_heads": KhaTalkingHeadsAttention,
}


# ---- MoE --------------------------------------------------------------------------------------


class KhaRouter(nn.Module):
    def __init__(self, dim: int, moe: dict) -> None:
        super().__init__()
        E = moe["num_experts"]
        self.top_k = moe["top_k"]
        self.score_func = str(moe.get("score_func", "softmax"))
        self.norm_topk = bool(moe.get("norm_topk_prob", True))
        self.weight = nn.Parameter(torch.zeros(E, dim))
        # The loss-free balancing bias: picks experts, never weighs them. Kept in fp32.
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # (N, E) fp32
        if self.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        _, ids = torch.topk(scores + self.expert_bias.float(), self.top_k, dim=-1)  # (N, K)
        gates = scores.gather(-1, ids)  # from the unbiased scores
        if self.norm_topk:
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return ids, gates


class KhaExperts(nn.Module):
    def __init__(self, dim: int, ffn: int, num_experts: int) -> None:
        super().__init__()
        self.w_gate_up_E2FD = nn.Parameter(torch.zeros(num_experts, 2 * ffn, dim))
        self.w_down_EDF = nn.Parameter(torch.zeros(num_experts, dim, ffn))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w_gate_up_E2FD[e].to(x.dtype).T).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down_EDF[e].to(x.dtype).T


class KhaMoE(nn.Module):
    def __init__(self, dim: int, moe: dict) -> None:
        super().__init__()
        self.num_experts, self.top_k = moe["num_experts"], moe["top_k"]
        self.router = KhaRouter(dim, moe)
        self.experts = KhaExperts(dim, moe["expert_ffn_size"], self.num_experts)
        shared = moe.get("num_shared_experts", 0)
        self.shared_experts = (
            KhaSwiGLU(dim, shared * moe["expert_ffn_size"]) if shared > 0 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        ids, gates = self.router(flat)  # (N, K)
        y = flat.new_zeros(B * T, self.top_k, D)
        for e in range(self.num_experts):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            if tok.numel():
                y[tok, slot] = self.experts.expert(e, flat[tok])
        out = (y.float() * gates.unsqueeze(-1)).sum(dim=1).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, D)


# ---- the model --------------------------------------------------------------------------------


class KhaBlock(nn.Module):
    def __init__(self, config: KhaConfig, layer_idx: int) -> None:
        super().__init__()
        D = config.hidden_size
        self.attn_norm = KhaRMSNorm(D, config.rms_norm_eps)
        self.attn = _ATTENTION[str(config.attention)](config, layer_idx)
        self.ffn_norm = KhaRMSNorm(D, config.rms_norm_eps)
        self.ffn = (
            KhaMoE(D, config.moe)
            if config.is_moe_layer(layer_idx)
            else KhaSwiGLU(D, config.intermediate_size)
        )

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class KhaPreTrainedModel(PreTrainedModel):
    config_class = KhaConfig
    base_model_prefix = "model"
    _no_split_modules = ["KhaBlock"]  # noqa: RUF012

    def _init_weights(self, module: nn.Module) -> None:
        # Only for weights missing from a checkpoint (an export has them all).
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            with torch.no_grad():
                module.weight.normal_(0.0, std)


class KhaModel(KhaPreTrainedModel):
    def __init__(self, config: KhaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(KhaBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = KhaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        past_key_values=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=h.device).expand(B, T)
        S = past + T
        # Causal: query t (at cache index past + t) sees keys 0 .. past + t; padding masked.
        mask = torch.arange(S, device=h.device)[None, :] <= (
            past + torch.arange(T, device=h.device)[:, None]
        )
        mask = mask[None, None].expand(B, 1, T, S)
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = mask & attention_mask[:, None, None, -S:].bool()
        layer0 = self.layers[0].attn
        cos, sin = rope_tables(position_ids, layer0.rope_dim, self.config.rope_theta)
        for block in self.layers:
            h = block(h, cos, sin, mask, cache)
        h = self.norm(h)
        return BaseModelOutputWithPast(last_hidden_state=h, **{_CACHE_FIELD: cache})


_CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else ("past_key_values")
)
_V5 = int(__import__("transformers").__version__.split(".")[0]) >= 5


class KhaForCausalLM(KhaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = (
        {"lm_head.weight": "model.embed_tokens.weight"} if _V5 else ["lm_head.weight"]
    )

    def __init__(self, config: KhaConfig) -> None:
        super().__init__(config)
        self.model = KhaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        past_key_values=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:  # labels as transformers takes them: shifted here
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}
        )


__all__ = ["KhaConfig", "KhaForCausalLM", "KhaModel", "KhaPreTrainedModel"]
