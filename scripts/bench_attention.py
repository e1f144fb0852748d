#!/usr/bin/env python3
"""Attention variants on the GPU: forward + backward of one attention layer per variant,
against GQA-4 (issue 7). Prints a markdown table for docs/performance.md.

    python scripts/bench_attention.py                      # Table 3 shapes: D 1536, d 128, B 2, T 4096
    python scripts/bench_attention.py --backend cudnn --seq 8192 --batch 1
    python scripts/bench_attention.py --only gqa4,mla,mla+kha

Each variant is the module `model.attention` builds (kha_train.model.build_attention) at the
paper's Table 3 head layout, with bf16 parameters (as FSDP's mixed precision hands them to the
model) and a bf16 input [B, T, D] that needs a gradient; the time is the median of --steps
CUDA-event-timed forward + backward passes after --warmup. TFLOP/s counts 6 x parameters +
the attention term of the variant (flops_per_token, no causal discount) + KHA's reuse, per
token. Talking heads materialises the [B, H, T, T] map (math path): it runs at its own
--talking-seq (default 1024) and its row says so. `--device cpu` runs the same code on tiny
shapes (in fp32) as a smoke test; the numbers are only meaningful on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kha_train.config import KHAConfig, MEAConfig, MLAConfig, ModelConfig
from kha_train.model import build_attention
from kha_train.model.kha import qkv_transforms
from kha_train.model.rope import RotaryEmbedding

MLP_V = KHAConfig("mlp", ["v"])
LIN_QKV = KHAConfig("linear", ["q", "k", "v"])
# name -> ModelConfig overrides of the Table 3 base (32 query / 4 KV heads of 128).
VARIANTS: dict[str, dict] = {
    "gqa4": {},
    "gqa4+kha": dict(kha=MLP_V),
    "gqa4+kha_linear": dict(kha=LIN_QKV),
    "mqa": dict(num_kv_heads=1),
    "mqa+kha": dict(num_kv_heads=1, kha=MLP_V),
    "gqa8_q16": dict(num_heads=16, num_kv_heads=8),
    "gqa8_q16+kha": dict(num_heads=16, num_kv_heads=8, kha=MLP_V),
    "mha16": dict(num_heads=16, num_kv_heads=16),
    "mha16+kha": dict(num_heads=16, num_kv_heads=16, kha=MLP_V),
    "gta": dict(attention="gta"),
    "gta+kha": dict(attention="gta", kha=MLP_V),
    "mla": dict(attention="mla", qk_norm=False, num_kv_heads=32, mla=MLAConfig(512, 1024, 64)),
    "mla+kha": dict(
        attention="mla", qk_norm=False, num_kv_heads=32, mla=MLAConfig(512, 1024, 64), kha=LIN_QKV
    ),
    "mea": dict(attention="mea"),
    "mea+kha": dict(attention="mea", kha=MLP_V),
    "mea_2cached": dict(attention="mea", mea=MEAConfig(cached_kv_heads=2)),
    "talking_heads": dict(attention="talking_heads", attn_backend="math"),
}


def kha_reuse_flops(attn: torch.nn.Module) -> int:
    """Per token: 6 x d^2 x (heads - 1) per KHA matrix (6 x params counts each use once)."""
    heads = (attn.num_heads, attn.num_kv_heads, attn.num_kv_heads)
    return sum(t.flops_per_token(h) for t, h in zip(qkv_transforms(attn), heads))


def time_variant(cfg: ModelConfig, batch: int, seq: int, args, device) -> dict:
    torch.manual_seed(0)
    attn = build_attention(cfg).to(device)
    attn.reset_parameters(cfg.init_std, cfg.init_std / 6)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU: smoke test only
    attn.to(dtype)
    rope_table = RotaryEmbedding(attn.rope_dim, cfg.rope_theta).to(device)
    rope_table.reset_parameters()
    rope = rope_table(seq)
    x = torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=dtype)
    x.requires_grad_(True)
    grad = torch.randn_like(x)

    def step() -> None:
        attn(x, rope).backward(grad)
        x.grad = None
        for p in attn.parameters():
            p.grad = None

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    ms = statistics.median(times)
    params = sum(p.numel() for p in attn.parameters())
    per_token = 6 * params + attn.flops_per_token(seq) + kha_reuse_flops(attn)
    return {
        "ms": ms,
        "params": params,
        "cache": attn.kv_cache_elems,
        "tflops": per_token * batch * seq / (ms * 1e-3) / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1536, help="model width D (Table 3: 1536)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--talking-seq", type=int, default=1024, help="sequence for talking heads")
    p.add_argument("--backend", default="auto", help="model.attn_backend: auto|cudnn|flash|...")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda", help="cuda (default) | cpu (smoke test only)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu only as a smoke test)", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    base = ModelConfig(
        hidden_size=args.hidden, num_layers=1, num_heads=32, num_kv_heads=4, head_dim=128,
        attn_backend=args.backend,
    )  # fmt: skip
    if device.type == "cuda":
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 parameters")
    print(
        f"# one attention layer, D {args.hidden}, head dim 128, batch {args.batch}, seq "
        f"{args.seq}, backend {args.backend}; median of {args.steps} fwd+bwd\n"
    )
    print(
        "| variant | seq | cache/token/layer | params (M) | fwd+bwd ms | x gqa4 | TFLOP/s | peak GiB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = {}
    for name in names:
        cfg = replace(base, **VARIANTS[name])
        seq = args.talking_seq if name == "talking_heads" else args.seq
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            rows[name] = (seq, time_variant(cfg, args.batch, seq, args, device))
        except torch.OutOfMemoryError:
            rows[name] = (seq, "out of memory")
        except RuntimeError as e:  # e.g. a backend without a kernel for this head size
            rows[name] = (seq, f"error: {str(e).splitlines()[0][:120]}")
    ref = rows.get("gqa4", (0, None))[1]
    ref = ref if isinstance(ref, dict) else None
    for name, (seq, r) in rows.items():
        if isinstance(r, str):
            print(f"| {name} | {seq} | | | {r} | | | |")
            continue
        rel = f"{r['ms'] / ref['ms']:.2f}" if ref and seq == args.seq else "-"
        print(
            f"| {name} | {seq} | {r['cache']} | {r['params'] / 1e6:.2f} | {r['ms']:.3f} | {rel} "
            f"| {r['tflops']:.0f} | {r['peak_gib']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
