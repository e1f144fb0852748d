"""`kha-train info`: the size, FLOPs, KHA overhead, KV cache and training memory of a config,
computed from the config alone (the model is built on the meta device, nothing is allocated)."""

from __future__ import annotations

import argparse
import dataclasses


def run_info(args: argparse.Namespace) -> int:
    from kha_train.config import ConfigError, load_config
    from kha_train.config_checks import validate_model

    cfg = load_config(args.config, args.overrides)
    errs = validate_model(cfg.model)
    if errs:
        raise ConfigError(f"{args.config}: invalid model config:\n  - " + "\n  - ".join(errs))
    ranks = args.ranks if args.ranks is not None else _default_ranks(cfg)
    if ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {ranks}")
    print(info_text(cfg, ranks))
    return 0


def _default_ranks(cfg) -> int:
    per_rank = cfg.train.micro_batch_size * cfg.data.seq_len
    for n in (8, 4, 2, 1):
        if cfg.train.global_batch_tokens % (per_rank * n) == 0:
            return n
    return 1


def info_text(cfg, ranks: int) -> str:
    """The report `kha-train info` prints for a loaded :class:`kha_train.config.Config`."""
    from kha_train.config import ACMode, KHAVariant
    from kha_train.model.flops import (
        kv_cache_bytes_per_token,
        kv_cache_elems_per_token_per_layer,
        paper_layer_flops,
        param_counts,
        train_flops_per_token,
        train_memory_estimate,
    )

    m, seq = cfg.model, cfg.data.seq_len
    total, active = param_counts(m)
    flops = train_flops_per_token(m, seq)
    base = dataclasses.replace(m, kha=dataclasses.replace(m.kha, variant=KHAVariant.none))
    base_total, _ = param_counts(base)
    base_flops = train_flops_per_token(base, seq)
    n_moe = sum(m.moe.is_moe_layer(i) for i in range(m.num_layers))
    lines = [
        f"{cfg.name}: {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_heads} query / {m.num_kv_heads} KV heads x {m.head_dim}, vocab {m.vocab_size:,} "
        f"({'tied' if m.tie_embeddings else 'untied'})"
    ]
    if m.moe.num_experts:
        lines.append(
            f"  MoE in {n_moe}/{m.num_layers} layers: {m.moe.num_experts} experts, top-{m.moe.top_k}, "
            f"expert FFN {m.moe.expert_ffn_size}, {m.moe.num_shared_experts} shared, "
            f"balancing {m.moe.balancing.value}"
            + (f"; dense FFN {m.ffn_size}" if n_moe < m.num_layers else "")
        )
    else:
        lines.append(f"  dense FFN {m.ffn_size}")
    lines.append(f"  attention: {_attention_text(m)}")
    kha = m.kha.variant.value
    lines.append(f"  KHA: {kha}" + (f" on {','.join(m.kha.targets)}" if kha != "none" else ""))
    lines += [
        f"parameters      total {_n(total)}, active {_n(active)} "
        f"(embedding {_n(m.vocab_size * m.hidden_size)})",
        f"FLOPs/token     {flops / 1e9:.3f} GFLOP at seq {seq} (6 x active non-embedding + attention)",
        f"KHA overhead    +{_n(total - base_total)} params ({(total - base_total) / base_total:+.4%}), "
        f"+{(flops - base_flops) / 1e6:.2f} MFLOP/token ({(flops - base_flops) / base_flops:+.4%}) "
        "vs model.kha.variant=none",
    ]
    if m.num_heads * m.head_dim == m.hidden_size:
        p = paper_layer_flops(seq, m.hidden_size, m.num_heads)
        lines.append(
            f"                paper eqs. 10-12 at L={seq}, d={m.hidden_size}, n={m.num_heads}: "
            f"{p['kha_vs_layer']:.2%} of a layer, {p['kha_vs_mha']:.2%} of attention"
        )
    lines.append(
        f"KV cache        {kv_cache_bytes_per_token(m) / 1024:.1f} KiB/token in bf16 "
        f"({kv_cache_elems_per_token_per_layer(m)} values per layer{_cache_parts(m)})"
    )
    from kha_train.training.parallel import reshards_after_forward, settings_line

    p = cfg.parallel
    mem = train_memory_estimate(
        m, cfg.train.micro_batch_size, seq, ranks,
        activation_checkpointing=ACMode(p.activation_checkpointing).value,
        ac_every_n=p.ac_every_n, reshard_after_forward=reshards_after_forward(p, ranks),
        single_device=p.single_device,
        accumulates=cfg.train.global_batch_tokens > cfg.train.micro_batch_size * seq * ranks,
    )  # fmt: skip
    parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in mem.items() if k != "total")
    lines.append(
        f"memory (rough)  {mem['total'] / 2**30:.1f} GiB per rank with {ranks} ranks, micro-batch "
        f"{cfg.train.micro_batch_size} x {seq}, activation checkpointing "
        f"{cfg.parallel.activation_checkpointing.value}: {parts}"
    )
    lines.append(f"on {ranks} GPU(s)    {settings_line(cfg, 'cuda', ranks)}")
    lines.append(f"on a CPU        {settings_line(cfg, 'cpu', 1)}")
    return "\n".join(lines)


def _attention_text(m) -> str:
    """One line on model.attention and its settings."""
    from kha_train.config import AttentionKind

    H, Hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    match AttentionKind(m.attention):
        case AttentionKind.gqa:
            return "gqa (" + ("MHA" if Hkv == H else "MQA" if Hkv == 1 else f"GQA-{Hkv}") + ")"
        case AttentionKind.gta:
            return f"gta ({Hkv} tied KV heads, one shared RoPE key head of {d // 2})"
        case AttentionKind.mla:
            q = m.mla.q_lora_rank or "none"
            return (
                f"mla (KV latent {m.mla.kv_lora_rank}, query latent {q}, RoPE part "
                f"{m.mla.rope_head_dim}, {Hkv} up-projected KV heads)"
            )
        case AttentionKind.mea:
            cached = m.mea.cached_kv_heads or Hkv
            return (
                f"mea ({cached} cached KV heads, HLC to {Hkv}, head norm "
                f"{'on' if m.mea.head_norm else 'off'})"
            )
        case AttentionKind.talking_heads:
            return f"talking_heads ({H} x {H} mixing before and after softmax; math path, slow)"
    return str(m.attention)


def _cache_parts(m) -> str:
    """How the cached values split up, for the variants that cache more than K and V heads."""
    from kha_train.config import AttentionKind

    match AttentionKind(m.attention):
        case AttentionKind.gta:
            return f": {m.num_kv_heads} x {m.head_dim} KV + {m.head_dim // 2} RoPE key"
        case AttentionKind.mla:
            return f": {m.mla.kv_lora_rank} latent + {m.mla.rope_head_dim} RoPE key"
    return ""


def _n(x: float) -> str:
    return (
        f"{x / 1e9:.3f}B" if abs(x) >= 1e9 else f"{x / 1e6:.2f}M" if abs(x) >= 1e6 else f"{x:,.0f}"
    )
