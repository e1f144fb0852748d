"""Configuration of a kha_train model exported for transformers (``trust_remote_code=True``).

Written by ``kha-train export`` into every export that no stock transformers class holds exactly;
imports only transformers. The kha_train ModelConfig is kept field by field: the usual
transformers names for the common sizes, and the variant settings as plain dicts
(``kha``, ``moe``, ``mla``, ``mea``) in kha_train's own field names.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class KhaConfig(PretrainedConfig):
    model_type = "kha_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # noqa: RUF012

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 1152,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 4,
        head_dim: int = 128,
        intermediate_size: int = 3072,
        rope_theta: float = 1_000_000.0,
        rms_norm_eps: float = 1e-6,
        qk_norm: bool = True,
        attention: str = "gqa",
        kha: dict[str, Any] | None = None,
        moe: dict[str, Any] | None = None,
        mla: dict[str, Any] | None = None,
        mea: dict[str, Any] | None = None,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm = qk_norm
        self.attention = attention
        self.kha = dict(kha or {"variant": "none", "targets": []})
        self.moe = dict(moe or {"num_experts": 0})
        self.mla = dict(mla or {})
        self.mea = dict(mea or {})
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def is_moe_layer(self, i: int) -> bool:
        """kha_train's MoEConfig.is_moe_layer: MoE iff experts, i >= first_k_dense and
        (i + 1) % moe_every_n == 0."""
        m = self.moe
        if not m.get("num_experts"):
            return False
        every = m.get("moe_every_n", 1) or 1
        return i >= m.get("first_k_dense", 0) and (i + 1) % every == 0
