"""The KV cache (kha_train/model/kv_cache.py): prefill + decoding over a cache gives the full
forward's logits at every position, for every attention variant, with and without KHA, with
chunked prefills and with left-padded batches of different lengths."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from model_helpers import build, make_cfg

from kha_train.config import MEAConfig, MLAConfig, ModelConfig
from kha_train.config_checks import validate_model
from kha_train.model import Transformer

MLA_TINY = MLAConfig(kv_lora_rank=12, q_lora_rank=10, rope_head_dim=4)

# name -> model overrides of the tiny config (4 query heads, 2 KV heads of 8, hidden 32).
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": dict(),
    "mqa": dict(num_kv_heads=1),
    "mha": dict(num_kv_heads=4),
    "gta": dict(attention="gta"),
    "mla": dict(attention="mla", qk_norm=False, mla=MLA_TINY),
    "mla_no_q_latent": dict(
        attention="mla",
        qk_norm=False,
        num_kv_heads=4,
        mla=MLAConfig(kv_lora_rank=12, q_lora_rank=0, rope_head_dim=4),
    ),
    "mea_virtual": dict(attention="mea", mea=MEAConfig(cached_kv_heads=1)),
    "talking_heads": dict(attention="talking_heads"),
}
# (variant, KHA kind, targets): none, KHA-MLP on v, KHA-Linear on q, k, v (MLA: linear only).
CASES = [
    (name, kha, targets)
    for name in VARIANTS
    for kha, targets in (("none", ("v",)), ("mlp", ("v",)), ("linear", ("q", "k", "v")))
    if not (name.startswith("mla") and kha == "mlp")
]


def _model(name: str, kha: str, targets: tuple[str, ...], **kw: Any) -> Transformer:
    cfg: ModelConfig = make_cfg(kha=kha, targets=targets, **{**VARIANTS[name], **kw})
    assert validate_model(cfg) == []
    model = build(cfg, seed=1)
    # Move every KHA, HLC and head-mix matrix off its identity init so that each one matters.
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in ("kha_", "hlc_", "_mix", "norm")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _decode(model: Transformer, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits of ids [B, T] computed through a KV cache, chunk by chunk."""
    cache, out, start = model.new_cache(), [], 0
    for n in chunks:
        out.append(model(ids[:, start : start + n], cache=cache))
        start += n
    assert start == ids.shape[1] and cache.length == start
    return torch.cat(out, dim=1)


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1e-4) -> None:
    atol = scale * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


@pytest.mark.parametrize(("name", "kha", "targets"), CASES)
def test_cached_decoding_equals_full_forward(name, kha, targets) -> None:
    model = _model(name, kha, targets, moe=False)
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
    # Prefill 5, then one token at a time; and a chunked prefill (4 + 3) over an existing cache.
    _close(_decode(model, ids, [5] + [1] * 6), full)
    _close(_decode(model, ids, [4, 3, 1, 1, 1, 1]), full)


@pytest.mark.parametrize("name", ["gqa", "mla", "mea_virtual", "talking_heads"])
def test_left_padded_batch_equals_each_prompt_alone(name) -> None:
    """Prompts of lengths 7 and 3 in one left-padded batch, then 3 decoding steps."""
    kha, targets = ("linear", ("q", "k", "v")) if name == "mla" else ("mlp", ("v",))
    model = _model(name, kha, targets, moe=False)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g) for n in (10, 6)]
    prompt_lens = (7, 3)
    P = max(prompt_lens)
    ids = torch.zeros(2, P, dtype=torch.long)
    mask = torch.zeros(2, P, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
        ids[b, P - n :], mask[b, P - n :] = s[:n], 1
    cache = model.new_cache()
    with torch.no_grad():
        steps = [model(ids, cache=cache, attention_mask=mask)[:, -1]]
        for i in range(3):
            nxt = torch.stack([s[n + i] for s, n in zip(seqs, prompt_lens)])[:, None]
            steps.append(model(nxt, cache=cache)[:, -1])
        for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
            alone = model(s[None, : n + 3])[0, n - 1 :]  # (4, V): after the prompt, then 3 steps
            _close(torch.stack([st[b] for st in steps]), alone)


def test_moe_model_with_kha(tiny_cfg) -> None:
    """An MoE model: routing may flip on near-ties between cached and full runs, so compare
    loosely (random init has no near-ties here in practice, so the check is still tight)."""
    model = _model("gqa", "mlp", ("v",), moe=True)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
    _close(_decode(model, ids, [4] + [1] * 5), full, scale=1e-3)


def test_cache_holds_what_the_variant_caches() -> None:
    """Per token and layer the cache holds attn.kv_cache_elems values (MLA: the 12 + 4 latent
    and RoPE key, MEA: the h_c = 1 cached heads, GTA: kv + one shared RoPE key)."""
    for name in ("gqa", "gta", "mla", "mea_virtual"):
        model = _model(name, "none", ("v",), moe=False)
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        per_token = sum(t[0, 0].numel() for t in cache.layers[0])
        assert per_token == model.layers[0].attn.kv_cache_elems, name


def test_training_forward_takes_no_cache_path() -> None:
    """Without a cache the forward is the training one: same loss, gradients flow."""
    model = build(make_cfg(moe=False), seed=0)
    ids = torch.randint(0, 97, (2, 8))
    loss = model(ids, torch.roll(ids, -1, dims=1))
    loss.backward()
    assert loss.ndim == 0 and model.embed_tokens.weight.grad is not None
