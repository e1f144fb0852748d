"""GPU throughput benchmark: full training steps of a config, with and without KHA, in one run.

    python scripts/bench.py --preset a0.44b                  # the reference workload
    kha-train bench --preset a0.44b --seq-len 8192 --micro-batch 2 --compile
    kha-train bench --config configs/paper/main/kha.yaml --variants kha --precision bf16,fp8

Each variant is timed over full optimizer steps: forward + backward of every micro-batch, global
grad-norm clipping, fused AdamW, and the MoE bias update from the step's expert counts (real,
unforced routing on random tokens), in the trainer's precision (fp32 master weights, bf16
compute). With ``--precision bf16,fp8`` every variant is timed in both precisions in the same
process (train.precision=fp8: the large dense projections' GEMMs in FP8, ``--fp8-*`` as
parallel.fp8). It prints tokens/s, TFLOP/s, MFU (torchtitan convention,
kha_train/model/flops.py) against the card's bf16 peak, peak memory, and a breakdown of step time from the PyTorch
profiler. The step is the trainer's own (``kha_train.training.step.train_step``), on a model
built by the trainer's ``build_model`` (see ``workload.py``).
"""
# This module is imported by `kha-train --help`: torch and the model load inside the handlers.

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

from kha_train.bench.settings import BenchSettings
from kha_train.config import (
    ACMode,
    AttnBackend,
    Fp8Config,
    Fp8Recipe,
    KHAConfig,
    KHAVariant,
    LossKernel,
    ModelConfig,
    MoEConfig,
    Precision,
    load_config,
)

# The paper's exploratory MoE sizes (Table 5), vocab 151,936 tied, GQA 32/4, head_dim 128,
# 64 experts top-4, KHA-MLP on V. (layers, hidden, expert FFN)
PRESETS = {
    "a0.44b": (12, 1152, 768),
    "a0.8b": (18, 1536, 1152),
    "a1.6b": (23, 2048, 1536),
}


def preset_config(name: str) -> ModelConfig:
    layers, hidden, ffn = PRESETS[name]
    return ModelConfig(
        vocab_size=151936,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        ffn_size=3 * hidden,
        attn_backend=AttnBackend.cudnn,
        moe=MoEConfig(num_experts=64, top_k=4, expert_ffn_size=ffn),
        kha=KHAConfig(variant=KHAVariant.mlp, targets=["v"]),
    )


BENCH_MODES = ("fsdp", "single", "autocast")  # BenchSettings.mode


def run(
    mcfg: ModelConfig,
    s: BenchSettings,
    variants: list[str],
    precisions: list[Precision] | None = None,
    modes: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Build, time and profile each variant (kha: ``mcfg``; nokha: without KHA) in each of
    ``precisions`` (default bf16) and ``modes`` (default ``s.mode``) in turn. A run that fails
    (out of memory, say) is reported with its error and the next one runs."""
    import gc
    import traceback

    import torch

    from kha_train.bench.profile import profile_breakdown
    from kha_train.bench.timing import time_workload
    from kha_train.bench.workload import Workload
    from kha_train.model.flops import param_counts
    from kha_train.training.flat_adamw import forget_compiled_lengths

    device = torch.device("cuda")
    results = []
    runs = [(m, p, v) for m in modes or [s.mode] for p in precisions or [Precision.bf16]
            for v in variants]  # fmt: skip
    for mode, precision, variant in runs:
        sm = dataclasses.replace(s, mode=mode)
        cfg = (
            mcfg
            if variant == "kha"
            else dataclasses.replace(mcfg, kha=KHAConfig(variant=KHAVariant.none))
        )
        total, active = param_counts(cfg)
        r: dict[str, Any] = {
            "variant": variant,
            "mode": mode,
            "precision": Precision(precision).value,
            "params_b": total / 1e9,
            "active_b": active / 1e9,
        }
        w = None
        try:
            w = Workload(cfg, sm, device, precision=Precision(precision))
            r["fp8_linears"] = len(w.fp8_modules)
            r.update(time_workload(w))
            if s.profile and r["sync_check"] in ("ok", "skipped"):
                r["breakdown_ms"] = profile_breakdown(w)
                r["top_kernels"] = w.top_kernels
        except Exception as e:  # report it, free the memory, go on with the next run
            traceback.print_exc()
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "top_kernels"}), flush=True)
        # Free this run's memory before the next one: the compiled graphs' caches keep the
        # model alive otherwise (a third variant in one process ran near full memory, slower).
        del w
        gc.collect()
        torch._dynamo.reset()
        forget_compiled_lengths()
        torch.cuda.empty_cache()
    return results


def format_table(results: list[dict[str, Any]], s: BenchSettings) -> str:
    f = s.fp8
    lines = [
        f"seq {s.seq_len} x micro-batch {s.micro_batch} x accum {s.accum}, compile={s.compile}, "
        f"ac={s.ac.value}, mode={','.join(dict.fromkeys(r.get('mode', s.mode) for r in results)) or s.mode}, "
        f"reshard={s.reshard}, defer_sync={s.defer_sync}, "
        f"loss kernel {LossKernel(s.loss_kernel).value}, "
        f"peak {s.peak_tflops:.0f} TFLOP/s; fp8: {Fp8Recipe(f.recipe).value}, dims >= "
        f"{f.min_dim}, FP8 all-gather {f.fsdp_fp8_all_gather}",
        f"{'variant':8} {'prec':>4} {'params':>8} {'active':>7} {'step ms':>8} {'tok/s':>9} "
        f"{'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>8} {'fp8 lin':>7} sync",
    ]
    several_modes = len({r.get("mode", s.mode) for r in results}) > 1
    for r in results:
        name = f"{r['variant']}/{r.get('mode', s.mode)}" if several_modes else r["variant"]
        head = f"{name:{12 if several_modes else 8}} {r.get('precision', 'bf16'):>4} {r['params_b']:7.3f}B "
        if "error" in r:
            lines.append(head + f"{r['active_b']:6.3f}B  failed: {r['error']}")
            continue
        lines.append(
            head + f"{r['active_b']:6.3f}B {r['step_ms']:8.1f} {r['tokens_per_s']:9.0f} "
            f"{r['tflops']:8.1f} {100 * r['mfu']:5.1f}% {r['peak_mem_gib']:8.1f} "
            f"{r.get('fp8_linears', 0):7d} {r.get('sync_check', '-')}"
        )
    ok = [r for r in results if "error" not in r]
    mode_of = {id(r): r.get("mode", s.mode) for r in ok}
    for mode in dict.fromkeys(mode_of.values()):
        this = [r for r in ok if mode_of[id(r)] == mode]
        tag = f", {mode}" if several_modes else ""
        for prec in dict.fromkeys(r.get("precision", "bf16") for r in this):
            by = {r["variant"]: r for r in this if r.get("precision", "bf16") == prec}
            if "kha" in by and "nokha" in by:
                ratio = by["kha"]["step_ms"] / by["nokha"]["step_ms"]
                lines.append(
                    f"KHA overhead ({prec}{tag}): step time x{ratio:.4f} "
                    f"({100 * (ratio - 1):+.2f}%)"
                )
        for variant in dict.fromkeys(r["variant"] for r in this):
            by = {r.get("precision", "bf16"): r for r in this if r["variant"] == variant}
            if "bf16" in by and "fp8" in by:
                speedup = by["fp8"]["tokens_per_s"] / by["bf16"]["tokens_per_s"]
                lines.append(f"FP8 speed-up ({variant}{tag}): tokens/s x{speedup:.4f} over bf16")
                lines.append(fp8_numerics_line(f"{variant}{tag}", by["bf16"], by["fp8"]))
    for variant, prec in dict.fromkeys((r["variant"], r.get("precision", "bf16")) for r in ok):
        by = {mode_of[id(r)]: r for r in ok
              if (r["variant"], r.get("precision", "bf16")) == (variant, prec)}  # fmt: skip
        if "single" in by and "fsdp" in by:
            lines += single_device_lines(f"{variant} {prec}", by["fsdp"], by["single"])
    for r in ok:
        if "breakdown_ms" in r:
            parts = sorted(r["breakdown_ms"].items(), key=lambda kv: -kv[1])
            total = sum(v for _, v in parts)
            name = f"{r['variant']}/{mode_of[id(r)]}" if several_modes else r["variant"]
            lines.append(
                f"{name} {r.get('precision', 'bf16')} GPU time/step {total:.1f} ms: "
                + ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in parts)
            )
    return "\n".join(lines)


# FP8 against bf16 on the first step: same seed, same weights, same tokens, so the losses differ
# only by FP8's rounding of the converted GEMMs (e4m3 keeps 3 mantissa bits: a few 1e-3 on a
# loss near ln(vocab) ~ 12 here); 2e-2 flags a broken path, not rounding.
FP8_FIRST_LOSS_RTOL = 2e-2


def fp8_numerics_line(variant: str, bf16: dict[str, Any], fp8: dict[str, Any]) -> str:
    """The bench's FP8 correctness check: the first step's loss in FP8 against bf16's."""
    if "first_loss" not in bf16 or "first_loss" not in fp8:
        return f"FP8 numerics ({variant}): not checked (no first-step loss)"
    a, b = bf16["first_loss"], fp8["first_loss"]
    rel = abs(b - a) / max(abs(a), 1e-12)
    verdict = "ok" if rel <= FP8_FIRST_LOSS_RTOL else f"FAILED (over {FP8_FIRST_LOSS_RTOL:g})"
    return (
        f"FP8 numerics ({variant}): first-step loss {b:.5f} vs bf16 {a:.5f}, "
        f"relative difference {rel:.1e}: {verdict}"
    )


# parallel.single_device against FSDP2, same seed, weights and tokens: the first step's loss is
# the same forward (equal up to the order of a few reductions); after the timed steps' updates
# (bf16 weights, AdamW at lr 3e-4) the runs part by bf16 rounding only: 5e-4 apart after 9
# updates on one H200 (docs/performance.md). 1e-2 flags a broken update, not rounding.
SINGLE_FIRST_LOSS_RTOL, SINGLE_LAST_LOSS_RTOL = 1e-4, 1e-2


def single_device_lines(name: str, fsdp: dict[str, Any], single: dict[str, Any]) -> list[str]:
    """The bench's check of parallel.single_device: its speed-up over FSDP2, and its losses
    (the first step's and the last timed step's) against FSDP2's."""
    lines = [
        f"single_device speed-up ({name}): tokens/s "
        f"x{single['tokens_per_s'] / fsdp['tokens_per_s']:.4f} over FSDP2"
    ]
    checks = []
    for key, rtol in (("first_loss", SINGLE_FIRST_LOSS_RTOL), ("loss", SINGLE_LAST_LOSS_RTOL)):
        if key not in fsdp or key not in single:
            return [*lines, f"single_device numerics ({name}): not checked (no {key})"]
        a, b = fsdp[key], single[key]
        rel = abs(b - a) / max(abs(a), 1e-12)
        checks.append((key, a, b, rel, rel <= rtol, rtol))
    verdict = "ok" if all(c[4] for c in checks) else "FAILED"
    detail = "; ".join(
        f"{'first step' if k == 'first_loss' else 'last timed step'} {b:.5f} vs {a:.5f} "
        f"({rel:.1e}{'' if good else f' > {rtol:g}'})"
        for k, a, b, rel, good, rtol in checks
    )
    return [*lines, f"single_device numerics ({name}): {detail}: {verdict}"]


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="a0.44b",
        help="Table 5 MoE size (default a0.44b: 2.34B total / 0.43B active)",
    )
    p.add_argument(
        "--config", help="a YAML run config instead of a preset (uses its model section)"
    )
    p.add_argument(
        "--kha",
        choices=["mlp", "linear"],
        default="mlp",
        help="KHA variant of the 'kha' run (linear applies to q, k, v)",
    )
    p.add_argument("--variants", default="kha,nokha", help="comma list of kha, nokha")
    p.add_argument(
        "--precision",
        default="bf16",
        help="comma list of bf16, fp8: each variant is timed in each (train.precision)",
    )
    p.add_argument(
        "--fp8-recipe",
        choices=[r.value for r in Fp8Recipe],
        default=Fp8Config.recipe.value,
        help="parallel.fp8.recipe (default tensorwise)",
    )
    p.add_argument(
        "--fp8-min-dim",
        type=int,
        default=Fp8Config.min_dim,
        help=f"parallel.fp8.min_dim: projections with both dims >= this run FP8 GEMMs "
        f"(default {Fp8Config.min_dim})",
    )
    p.add_argument(
        "--fp8-all-gather",
        action="store_true",
        help="parallel.fp8.fsdp_fp8_all_gather=true (FSDP2 gathers the FP8 weights in FP8)",
    )
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile each block (the default on a GPU, as in the trainer)",
    )
    p.add_argument(
        "--no-compile", dest="compile", action="store_false", help="run the blocks eagerly"
    )
    p.add_argument("--ac", choices=[m.value for m in ACMode], default="none")
    p.add_argument("--ac-every-n", type=int, default=2)
    p.add_argument("--attn-backend", choices=[b.value for b in AttnBackend], default=None)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100: 989)")
    p.add_argument(
        "--mode",
        default="fsdp",
        help="fsdp: the trainer's FSDP2 bf16 mixed precision; single: parallel.single_device "
        "(no FSDP2: flat bf16 weights, fp32 masters, FlatAdamW); autocast: fp32 weights "
        "on one GPU under bf16 autocast (the baseline of docs/performance.md); several, "
        "comma-separated, run in turn (single,fsdp also compares their speed and losses)",
    )
    p.add_argument(
        "--no-reshard",
        dest="reshard",
        action="store_false",
        default=None,
        help="parallel.reshard_after_forward=false: keep gathered parameters for the backward "
        "(the default on one GPU)",
    )
    p.add_argument(
        "--reshard",
        dest="reshard",
        action="store_true",
        help="parallel.reshard_after_forward=true: free them after the forward (ZeRO-3)",
    )
    p.add_argument(
        "--no-defer-sync",
        action="store_true",
        help="parallel.defer_grad_sync=false: gather parameters and reduce gradients for every "
        "micro-batch (default on one GPU: once per step)",
    )
    p.add_argument("--loss-chunk", type=int, help="tokens per LM-head + loss chunk (default 4096)")
    p.add_argument(
        "--loss-kernel",
        choices=[k.value for k in LossKernel],
        default=LossKernel.chunked.value,
        help="parallel.loss_kernel: chunked (ours, default), liger or cce (the fast extra)",
    )
    p.add_argument(
        "--no-compile-loss",
        action="store_true",
        help="run the LM-head + loss chunks eagerly (parallel.compile_loss=false)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="train.deterministic=true: torch's deterministic kernels, a fixed cuBLAS workspace "
        "(training/determinism.py); the cost in tokens/s against a run without it",
    )
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-sync-check", action="store_true")
    p.add_argument("--json", help="append results as JSON lines to this file")
    return p


def main(args: argparse.Namespace) -> int:
    import torch  # here, not at the top: `kha-train --help` imports this module

    from kha_train.training.device_memory import default_allocator_config

    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in BENCH_MODES]
    if bad or not modes:
        raise SystemExit(
            f"kha-train bench --mode {args.mode}: each one of {', '.join(BENCH_MODES)}"
        )
    default_allocator_config()  # before CUDA initialises, as the trainer does
    if not torch.cuda.is_available():
        raise SystemExit("kha-train bench needs a CUDA GPU")
    if args.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting once
        from kha_train.training.determinism import make_deterministic

        make_deterministic()
    precisions = [Precision(p.strip()) for p in args.precision.split(",") if p.strip()]
    from kha_train.config_checks import loss_kernel_errors

    errs = loss_kernel_errors(args.loss_kernel, "cuda")
    if errs:
        raise SystemExit("kha-train bench --loss-kernel: " + "; ".join(errs))
    if Precision.fp8 in precisions:
        from kha_train.config_checks import fp8_support_errors

        errs = fp8_support_errors("cuda")
        if errs:
            raise SystemExit("kha-train bench --precision fp8: " + "; ".join(errs))
    if args.config:
        mcfg = load_config(args.config).model
    else:
        mcfg = preset_config(args.preset)
    if args.kha == "linear":
        mcfg = dataclasses.replace(
            mcfg, kha=KHAConfig(variant=KHAVariant.linear, targets=["q", "k", "v"])
        )
    if args.attn_backend:
        mcfg = dataclasses.replace(mcfg, attn_backend=AttnBackend(args.attn_backend))
    s = BenchSettings(
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        accum=args.accum,
        steps=args.steps,
        warmup=args.warmup,
        compile=True if args.compile is None else args.compile,  # the GPU default
        ac=ACMode(args.ac),
        ac_every_n=args.ac_every_n,
        peak_tflops=args.peak_tflops,
        profile=not args.no_profile,
        sync_check=not args.no_sync_check,
        mode=modes[0],
        reshard=args.reshard,
        defer_sync=not args.no_defer_sync,
        loss_chunk=args.loss_chunk,
        compile_loss=not args.no_compile_loss,
        loss_kernel=LossKernel(args.loss_kernel),
        fp8=Fp8Config(
            recipe=Fp8Recipe(args.fp8_recipe),
            min_dim=args.fp8_min_dim,
            fsdp_fp8_all_gather=args.fp8_all_gather,
        ),
    )
    print(
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}"
    )
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    results = run(mcfg, s, variants, precisions, modes)
    print(format_table(results, s))
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(
                    json.dumps(
                        {
                            **r,
                            "settings": dataclasses.asdict(s)
                            | {"ac": s.ac.value, "fp8": _fp8_dict(s.fp8)}
                            | {"mode": r.get("mode", s.mode)},
                            "device": torch.cuda.get_device_name(),
                            "deterministic": args.deterministic,
                        }
                    )
                    + "\n"
                )
    return 1 if any("error" in r for r in results) else 0


def _fp8_dict(f: Fp8Config) -> dict[str, Any]:
    return dataclasses.asdict(f) | {"recipe": Fp8Recipe(f.recipe).value}


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="time full training steps on a GPU", description=__doc__
    )
    build_arg_parser(p)
    p.set_defaults(func=main)
