"""Model commands:

- `kha-train info CONFIG [key=value ...]`: sizes, FLOPs, KHA overhead, KV cache and memory of a
  config, computed without allocating the model;
- `kha-train virtual-heads SOURCE --kv-heads N [key=value ...]`: MEA's virtual heads, the KV
  heads of a trained GQA / MEA model factored into fewer cached heads (virtual_heads.py), with
  the held-out loss before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="parameters, FLOPs/token, KHA overhead, KV cache and memory of a config",
        description=(
            "Print the model size (total and active parameters), training FLOPs per token "
            "(torchtitan MFU convention), the KHA overhead against the same config with "
            "model.kha.variant=none, KV-cache bytes per token and a rough per-rank training "
            "memory estimate. Nothing is allocated: the model is built on the meta device."
        ),
    )
    p.add_argument("config", help="run config YAML (e.g. configs/paper/main_kha.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.num_layers=24")
    p.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="data-parallel ranks for the memory estimate (default: the smallest count the "
        "global batch allows with this micro-batch, capped at 8)",
    )
    p.set_defaults(func=run_info)

    v = subparsers.add_parser(
        "virtual-heads",
        help="factor a trained GQA/MEA model's KV heads into fewer cached heads (MEA)",
        description=(
            "MEA's virtual heads (Peng et al. 2026, appendix F): factor each layer's K and V "
            "projections by SVD over the head axis into --kv-heads cached heads, expanded back "
            "by MEA's head-level linear composition at attention time. The KV cache shrinks by "
            "num_kv_heads / --kv-heads. Prints the held-out loss (the dataset's val split) "
            "before and after, and with --out writes the converted weights (safetensors) and "
            "their config (same name, .yaml)."
        ),
    )
    v.add_argument(
        "source",
        help="a trainer checkpoint folder (checkpoints/step_XXXXXXX, config read from its "
        "config.yaml), or a .safetensors / .pt state-dict file (then give --config)",
    )
    v.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides right after SOURCE, e.g. data.dataset=DIR train.micro_batch_size=1",
    )
    v.add_argument("--kv-heads", type=int, required=True, help="KV heads to cache per layer")
    v.add_argument("--config", help="run config YAML of the weights (required for files)")
    v.add_argument(
        "--batches", type=int, default=8, help="held-out micro-batches to evaluate (default 8)"
    )
    v.add_argument("--out", help="write the converted weights here (.safetensors) + a .yaml")
    v.add_argument("--device", default="auto", help="auto (cuda if available) | cuda | cpu")
    v.set_defaults(func=run_virtual_heads)


def run_info(args: argparse.Namespace) -> int:
    from kha_train.config import ConfigError, load_config, validate_model

    cfg = load_config(args.config, args.overrides)
    errs = validate_model(cfg.model)
    if errs:
        raise ConfigError(f"{args.config}: invalid model config:\n  - " + "\n  - ".join(errs))
    ranks = args.ranks if args.ranks is not None else _default_ranks(cfg)
    if ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {ranks}")
    print(info_text(cfg, ranks))
    return 0


def run_virtual_heads(args: argparse.Namespace) -> int:
    import torch

    from kha_train.config import (
        AttnBackend,
        ConfigError,
        save_config,
    )
    from kha_train.model.flops import kv_cache_elems_per_token_per_layer
    from kha_train.model.virtual_heads import convert_to_virtual_heads
    from kha_train.model.weights_io import load_model, load_source_config, save_weights

    source = Path(args.source)
    out = Path(args.out) if args.out else None
    if out is not None and (out.suffix != ".safetensors" or out.exists()):
        raise ConfigError(
            f"--out {out}: must be a new .safetensors path (it exists, or has another suffix)"
        )
    cfg = load_source_config(source, args.config, args.overrides)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if device.type != "cuda" and cfg.model.attn_backend not in (AttnBackend.auto, "math"):
        print(f"note: model.attn_backend={cfg.model.attn_backend.value} needs CUDA; using auto")
        cfg.model.attn_backend = AttnBackend.auto
    model = load_model(cfg.model, source, device)
    batches = _heldout_batches(cfg, args.batches, device)
    before = _heldout_loss(model, batches)
    new = convert_to_virtual_heads(model, args.kv_heads)
    after = _heldout_loss(new, batches)
    cache, new_cache = (kv_cache_elems_per_token_per_layer(c) for c in (cfg.model, new.cfg))
    tokens = sum(b.labels.numel() for b in batches)
    print(
        f"virtual heads: {cfg.model.num_kv_heads} -> {args.kv_heads} cached KV heads per layer "
        f"(KV cache {cache} -> {new_cache} values per token per layer)\n"
        f"held-out loss ({len(batches)} batches, {tokens:,} tokens of {cfg.data.dataset} val): "
        f"before {before:.4f}, after {after:.4f} ({after - before:+.4f})"
    )
    if out is not None:
        save_weights(new, out)
        save_config(dataclasses.replace(cfg, model=new.cfg), out.with_suffix(".yaml"))
        print(f"wrote {out} and {out.with_suffix('.yaml')}")
    return 0


def _heldout_batches(cfg, n: int, device):
    from kha_train.data.loader import PackedLoader

    mb = cfg.train.micro_batch_size
    loader = PackedLoader(
        cfg.data.dataset,
        "val",
        seq_len=cfg.data.seq_len,
        micro_batch_size=mb,
        global_batch_size=mb,
        prefetch=0,
        device=device,
        expected_vocab_size=cfg.model.vocab_size,
    )
    with loader:
        return list(loader.eval_batches(n))


def _heldout_loss(model, batches) -> float:
    """Mean next-token loss over every labelled position of ``batches`` (bf16 on CUDA)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    cuda = next(model.parameters()).is_cuda
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=cuda):
        for b in batches:
            n = int((b.labels != -100).sum())
            model.last_aux_loss = None
            loss = model(b.input_ids, b.labels)
            if model.last_aux_loss is not None:  # balancing=aux_loss: report the LM loss only
                loss = loss - model.last_aux_loss
            total += loss.item() * n
            count += n
    return total / max(count, 1)


def _default_ranks(cfg) -> int:
    per_rank = cfg.train.micro_batch_size * cfg.data.seq_len
    for n in (8, 4, 2, 1):
        if cfg.train.global_batch_tokens % (per_rank * n) == 0:
            return n
    return 1


def info_text(cfg, ranks: int) -> str:
    """The report `kha-train info` prints for a loaded :class:`kha_train.config.Config`."""
    from kha_train.config import ACMode, KHAVariant, is_moe_layer
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
    n_moe = sum(is_moe_layer(m.moe, i) for i in range(m.num_layers))
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
    ac = cfg.parallel.activation_checkpointing != ACMode.none
    mem = train_memory_estimate(
        m, cfg.train.micro_batch_size, seq, ranks, activation_checkpointing=ac
    )
    parts = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in mem.items() if k != "total")
    lines.append(
        f"memory (rough)  {mem['total'] / 2**30:.1f} GiB per rank with {ranks} ranks, micro-batch "
        f"{cfg.train.micro_batch_size} x {seq}, activation checkpointing "
        f"{cfg.parallel.activation_checkpointing.value}: {parts}"
    )
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
