"""GPU throughput benchmark: full training steps of a config, with and without KHA, in one run.

    python scripts/bench.py --preset a0.44b                  # the reference workload
    kha-train bench --preset a0.44b --seq-len 8192 --micro-batch 2 --compile

Each variant is timed over full optimizer steps: forward + backward of every micro-batch, global
grad-norm clipping, fused AdamW, and the MoE bias update from the step's expert counts (real,
unforced routing on random tokens), in the trainer's precision (fp32 master weights, bf16
compute). It prints tokens/s, TFLOP/s, MFU (torchtitan convention, kha_train/model/flops.py)
against the card's bf16 peak, peak memory, and a breakdown of step time from the PyTorch
profiler. The step uses the same building blocks as the trainer (``kha_train.training``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
from collections import defaultdict
from typing import Any

import torch

from kha_train.config import (
    ACMode,
    AttnBackend,
    KHAConfig,
    KHAVariant,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    Precision,
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


def gpu_state() -> str:
    """SM clock / max, temperature, power and active throttle reasons (nvidia-smi), to tell
    a throttled card from a slow change."""
    import subprocess

    query = "clocks.sm,clocks.max.sm,temperature.gpu,power.draw,clocks_event_reasons.active"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# One variant: build, step, time
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchSettings:
    seq_len: int = 4096
    micro_batch: int = 4
    accum: int = 1  # micro-batches per optimizer step
    steps: int = 10  # timed optimizer steps
    warmup: int = 3
    compile: bool = False
    ac: ACMode = ACMode.none
    ac_every_n: int = 2
    peak_tflops: float = 989.0
    profile: bool = True
    sync_check: bool = True
    # FSDP2 reshard_after_forward; None: the trainer's default (off on one GPU)
    reshard: bool | None = None
    defer_sync: bool = True  # parallel.defer_grad_sync: one gather and one reduce per step
    loss_chunk: int | None = None  # tokens per LM-head + loss chunk (None: the model's default)
    # fsdp: the trainer's FSDP2 mixed precision | autocast: fp32 weights + autocast
    mode: str = "fsdp"


class Workload:
    """A model + optimizer in the trainer's precision, and a function doing one optimizer step."""

    def __init__(self, mcfg: ModelConfig, s: BenchSettings, device: torch.device) -> None:
        from kha_train.model import Transformer

        self.cfg, self.s, self.device = mcfg, s, device
        with torch.device("meta"):
            model = Transformer(mcfg)
        self.autocast = s.mode == "autocast"
        # The trainer's parallel settings (in autocast mode there is no FSDP for them to act on).
        self.pcfg = ParallelConfig(
            activation_checkpointing=s.ac,
            ac_every_n=s.ac_every_n,
            compile=s.compile,
            reshard_after_forward=s.reshard,
            defer_grad_sync=s.defer_sync,
        )
        if self.autocast:
            # fp32 weights on the device, bf16 compute through autocast (single GPU).
            if s.compile:
                for block in model.layers:
                    block.compile()
            self.model = model
        else:
            # The trainer's path: FSDP2 mixed precision (bf16 params/compute, fp32 master
            # weights and gradient reduction), AC and compile applied by parallelize().
            from kha_train.training.parallel import parallelize

            self.model = parallelize(model, self.pcfg, Precision.bf16, device)
        if s.loss_chunk:
            model.loss_chunk_tokens = s.loss_chunk
        self.model.to_empty(device=device)
        torch.manual_seed(0)
        self.model.init_weights()
        from kha_train.training.optim import build_optimizer

        self.opt = build_optimizer(self.model, OptimConfig(lr=3e-4, implementation="fused"), device)
        g = torch.Generator(device=device).manual_seed(0)
        shape = (s.micro_batch, s.seq_len)
        # A few distinct batches so nothing is cached between micro-batches.
        self.batches = [
            (
                torch.randint(0, mcfg.vocab_size, shape, device=device, generator=g),
                torch.randint(0, mcfg.vocab_size, shape, device=device, generator=g),
            )
            for _ in range(4)
        ]
        self._i = 0
        self.top_kernels: list[tuple[str, float, int]] = []

    def step(self) -> torch.Tensor:
        from kha_train.model import collect_expert_counts, update_expert_bias
        from kha_train.training.optim import clip_gradients, global_grad_norm
        from kha_train.training.parallel import set_micro_batch_sync

        total = torch.zeros((), device=self.device)
        for i in range(self.s.accum):
            set_micro_batch_sync(self.model, self.pcfg, last=i == self.s.accum - 1)
            ids, labels = self.batches[self._i % len(self.batches)]
            self._i += 1
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.model(ids, labels) / self.s.accum
            loss.backward()
            total += loss.detach()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip_gradients(self.opt, params, global_grad_norm(params), 1.0)  # as the trainer clips
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        update_expert_bias(self.model, collect_expert_counts(self.model))
        return total


def time_workload(w: Workload) -> dict[str, float]:
    s = w.s
    for _ in range(s.warmup):
        w.step()
    _sync()
    if s.sync_check and torch.cuda.is_available():
        # Any host-device synchronisation inside a step raises here.
        torch.cuda.set_sync_debug_mode("error")
        try:
            w.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _sync()
    torch.cuda.reset_peak_memory_stats()
    state_before = gpu_state()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(s.steps):
        loss = w.step()
    end.record()
    _sync()
    wall = time.perf_counter() - t0
    state_after = gpu_state()
    step_ms = start.elapsed_time(end) / s.steps
    tokens = s.micro_batch * s.seq_len * s.accum
    from kha_train.model.flops import train_flops_per_token

    fpt = train_flops_per_token(w.cfg, s.seq_len)
    tps = tokens / (step_ms / 1e3)
    return {
        "step_ms": step_ms,
        "wall_step_ms": wall / s.steps * 1e3,
        "tokens_per_s": tps,
        "tflops": tps * fpt / 1e12,
        "mfu": tps * fpt / (s.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        # cudaMalloc retries mean the allocator ran out of cached blocks: slow, and it syncs.
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0),
        "loss": float(loss),
        "gpu_before": state_before,
        "gpu_after": state_after,
    }


# ----------------------------------------------------------------------------------------------
# Profiler breakdown
# ----------------------------------------------------------------------------------------------

# Step time is split by where each GPU kernel came from. Two CPU-side scopes are found on the
# stack of ops enclosing the kernel's launch: the optimizer (grad clipping and AdamW) and the LM
# head + loss (a profiler range the benchmark puts around the model's loss call). Inside
# compiled blocks ops have no names of their own, so the rest is split by kernel name.
STACK_CATEGORIES = [
    ("optimizer", ("optimizer.step", "adamw", "clip_grad", "_foreach_norm")),
    ("lm_head+loss", ("lm_head+loss",)),
]
KERNEL_CATEGORIES = [
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn")),
    ("expert_gemm", ("group",)),
    ("moe_dispatch", ("sort", "scatter", "gather", "index", "topk", "cumsum", "radix", "bincount")),
    ("dense_gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul")),
    (
        "fsdp_copies",
        (
            "chunk_cat",
            "split_with_sizes",
            "foreach_copy",
            "all_gather",
            "reduce_scatter",
            "nccl",
            "memcpy",
        ),
    ),
]


def _category(names: list[str], table: list[tuple[str, tuple[str, ...]]]) -> str | None:
    """The first category of ``table`` that any of ``names`` matches."""
    lowered = [n.lower() for n in names]
    for cat, keys in table:
        if any(k in n for n in lowered for k in keys):
            return cat
    return None


def profile_breakdown(
    w: Workload, steps: int = 2, trace_path: str | None = None
) -> dict[str, float]:
    """Milliseconds of GPU kernel time per step in each category (plus 'other').

    Each kernel is counted once: it is matched to the CPU launch call with the same correlation
    id, and categorised by the innermost enclosing CPU op (on the launching thread) whose name
    matches a category; backward kernels fall under their autograd node (e.g.
    ``GroupedMmBackward0``)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    _sync()
    import kha_train.model.transformer as transformer

    loss_fn = transformer.chunked_cross_entropy

    def labelled_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.profiler.record_function("lm_head+loss"):
            return loss_fn(*args, **kwargs)

    transformer.chunked_cross_entropy = labelled_loss  # the loss's work is all in its forward
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                w.step()
            _sync()
    finally:
        transformer.chunked_cross_entropy = loss_fn
    path = trace_path or tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    cats, top = breakdown_from_trace(events)
    w.top_kernels = [(n, ms / steps, c // steps) for n, ms, c in top]
    return {k: v / steps for k, v in cats.items()}


def breakdown_from_trace(
    events: list[dict[str, Any]],
) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """(kernel ms per category, top kernels as (name, ms, count)) from a Chrome trace's events."""
    kernels: dict[Any, list[dict[str, Any]]] = defaultdict(list)  # correlation id -> kernels
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels[e.get("args", {}).get("correlation")].append(e)
    # Per thread, sweep CPU ops and launch calls in time order with a stack of open ops: the
    # stack at a launch is the chain of ops that enclose it.
    by_tid: dict[Any, list[tuple[float, int, dict[str, Any]]]] = defaultdict(list)
    for e in events:
        cat = e.get("cat")
        if cat in ("cpu_op", "user_annotation", "python_function") and "dur" in e:
            by_tid[e["tid"]].append((e["ts"], 0, e))  # ops before launches at equal ts
        elif (
            cat in ("cuda_runtime", "cuda_driver")
            and e.get("args", {}).get("correlation") in kernels
        ):
            by_tid[e["tid"]].append((e["ts"], 1, e))
    scope: dict[Any, str | None] = {}  # correlation id -> stack category
    for items in by_tid.values():
        items.sort(key=lambda t: (t[0], t[1], -t[2].get("dur", 0)))
        stack: list[tuple[float, str]] = []  # (end time, op name)
        for ts, kind, e in items:
            while stack and stack[-1][0] < ts:
                stack.pop()
            if kind == 0:
                stack.append((ts + e["dur"], e["name"]))
            else:
                scope[e["args"]["correlation"]] = _category([n for _, n in stack], STACK_CATEGORIES)
    out: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for corr, ks in kernels.items():
        for k in ks:
            cat = scope.get(corr) or _category([k["name"]], KERNEL_CATEGORIES) or "other"
            ms = k.get("dur", 0) / 1e3
            out[cat] += ms
            per_kernel[k["name"][:90]][0] += ms
            per_kernel[k["name"][:90]][1] += 1
    top = sorted(((n, v[0], int(v[1])) for n, v in per_kernel.items()), key=lambda t: -t[1])
    return dict(out), top[:40]


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def run(mcfg: ModelConfig, s: BenchSettings, variants: list[str]) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    from kha_train.model.flops import param_counts

    results = []
    for variant in variants:
        cfg = (
            mcfg
            if variant == "kha"
            else dataclasses.replace(mcfg, kha=KHAConfig(variant=KHAVariant.none))
        )
        total, active = param_counts(cfg)
        w = Workload(cfg, s, device)
        r: dict[str, Any] = {"variant": variant, "params_b": total / 1e9, "active_b": active / 1e9}
        r.update(time_workload(w))
        if s.profile:
            r["breakdown_ms"] = profile_breakdown(w)
            r["top_kernels"] = w.top_kernels
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "top_kernels"}), flush=True)
        # Free this variant's memory before the next one: the compiled graphs' caches keep the
        # model alive otherwise (a third variant in one process ran near full memory, slower).
        del w
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return results


def format_table(results: list[dict[str, Any]], s: BenchSettings) -> str:
    lines = [
        f"seq {s.seq_len} x micro-batch {s.micro_batch} x accum {s.accum}, compile={s.compile}, "
        f"ac={s.ac.value}, mode={s.mode}, reshard={s.reshard}, defer_sync={s.defer_sync}, "
        f"peak {s.peak_tflops:.0f} TFLOP/s",
        f"{'variant':8} {'params':>8} {'active':>7} {'step ms':>8} {'tok/s':>9} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'mem GiB':>8}",
    ]
    for r in results:
        lines.append(
            f"{r['variant']:8} {r['params_b']:7.3f}B {r['active_b']:6.3f}B {r['step_ms']:8.1f} "
            f"{r['tokens_per_s']:9.0f} {r['tflops']:8.1f} {100 * r['mfu']:5.1f}% "
            f"{r['peak_mem_gib']:8.1f}"
        )
    by = {r["variant"]: r for r in results}
    if "kha" in by and "nokha" in by:
        ratio = by["kha"]["step_ms"] / by["nokha"]["step_ms"]
        lines.append(f"KHA overhead: step time x{ratio:.4f} ({100 * (ratio - 1):+.2f}%)")
    for r in results:
        if "breakdown_ms" in r:
            parts = sorted(r["breakdown_ms"].items(), key=lambda kv: -kv[1])
            total = sum(v for _, v in parts)
            lines.append(
                f"{r['variant']} GPU time/step {total:.1f} ms: "
                + ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in parts)
            )
    return "\n".join(lines)


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
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--ac", choices=[m.value for m in ACMode], default="none")
    p.add_argument("--ac-every-n", type=int, default=2)
    p.add_argument("--attn-backend", choices=[b.value for b in AttnBackend], default=None)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100: 989)")
    p.add_argument(
        "--mode",
        choices=["fsdp", "autocast"],
        default="fsdp",
        help="fsdp: the trainer's FSDP2 bf16 mixed precision; autocast: fp32 weights "
        "on one GPU under bf16 autocast",
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
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--no-sync-check", action="store_true")
    p.add_argument("--json", help="append results as JSON lines to this file")
    return p


def main(args: argparse.Namespace) -> int:
    # Less fragmentation near full memory (set before CUDA initialises; the trainer does too).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not torch.cuda.is_available():
        raise SystemExit("kha-train bench needs a CUDA GPU")
    if args.config:
        from kha_train.config import load_config

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
        compile=args.compile,
        ac=ACMode(args.ac),
        ac_every_n=args.ac_every_n,
        peak_tflops=args.peak_tflops,
        profile=not args.no_profile,
        sync_check=not args.no_sync_check,
        mode=args.mode,
        reshard=args.reshard,
        defer_sync=not args.no_defer_sync,
        loss_chunk=args.loss_chunk,
    )
    print(
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}"
    )
    results = run(mcfg, s, [v.strip() for v in args.variants.split(",") if v.strip()])
    print(format_table(results, s))
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(
                    json.dumps(
                        {
                            **r,
                            "settings": dataclasses.asdict(s) | {"ac": s.ac.value},
                            "device": torch.cuda.get_device_name(),
                        }
                    )
                    + "\n"
                )
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="time full training steps on a GPU", description=__doc__
    )
    build_arg_parser(p)
    p.set_defaults(func=main)


if __name__ == "__main__":
    raise SystemExit(main(build_arg_parser().parse_args()))
