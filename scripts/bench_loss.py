#!/usr/bin/env python3
"""LM head + loss on one GPU: ours against the field's fused linear-cross-entropy kernels.

For each shape (tokens N, hidden D, vocab V; bf16 hidden states [N, D] and head weight [V, D],
random targets, 1% of them ignored) every candidate computes the mean cross entropy of
hidden @ weight^T and its gradients for both inputs. Each is first checked against ours (eager):
the loss within 2e-3 (relative) and both gradients within 3e-2 (relative L2 norm, bf16); only a
candidate that passes is timed: forward + backward, median over --iters after --warmup (CUDA
events), and the peak memory it allocates beyond its inputs (gradients included).

    python scripts/bench_loss.py                       # the reference and main-model shapes
    python scripts/bench_loss.py --shapes ref --out loss.json
    python scripts/bench_loss.py --tokens 16384 --hidden 2048
    python scripts/bench_loss.py --device cpu --tokens 256 --hidden 64 --vocab 1000  # logic check

Candidates (a library that does not import is skipped, with a note):
    ours           kha_train.model.loss.chunked_cross_entropy, compiled chunks (the trainer's)
    ours-eager     the same, eager
    liger          liger-kernel's fused linear cross entropy, fp32 weight-gradient accumulation
                   (parallel.loss_kernel=liger: the call the trainer makes, model/loss_kernels.py)
    liger-bf16acc  the same, accumulating in bf16 (its default)
    liger-c4       fp32 accumulation, chunk_mem_const=4 (larger chunks, more memory)
    cce            cut-cross-entropy (Apple), its default gradient filter (filter_eps="high")
                   (parallel.loss_kernel=cce, likewise)
    cce-exact      the same, no filter (filter_eps=None)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# (tokens, hidden): the reference A0.44B (micro-batch 6 x 4096) and the main model (hidden
# 2048; micro-batch 2 x 4096, as its benchmark in scripts/device/perf.sh); vocab 151,936.
SHAPES = {"ref": (6 * 4096, 1152), "main": (2 * 4096, 2048)}
VOCAB = 151936
LOSS_RTOL, GRAD_RTOL = 2e-3, 3e-2

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def candidates() -> tuple[dict[str, LossFn], dict[str, str]]:
    """name -> loss(hidden, weight, labels), and name -> why it is skipped."""
    from kha_train.model.loss import IGNORE_INDEX, chunked_cross_entropy
    from kha_train.model.loss_kernels import fused_linear_cross_entropy as fused

    fns: dict[str, LossFn] = {
        "ours": lambda h, w, y: chunked_cross_entropy(h, w, y, compiled=True),
        "ours-eager": lambda h, w, y: chunked_cross_entropy(h, w, y, compiled=False),
    }
    skipped: dict[str, str] = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lfce

        fns["liger"] = lambda h, w, y: fused("liger", h, w, y, IGNORE_INDEX)  # the trainer's call
        fns["liger-bf16acc"] = lambda h, w, y: lfce(h, w, y, ignore_index=IGNORE_INDEX)
        fns["liger-c4"] = lambda h, w, y: lfce(h, w, y, ignore_index=IGNORE_INDEX,
                                               accum_dtype=torch.float32, chunk_mem_const=4)  # fmt: skip
    except Exception as e:  # ImportError, or a triton / transformers mismatch at import
        skipped["liger"] = (
            f"liger-kernel does not import ({type(e).__name__}: {e}); pip install liger-kernel==0.8.5"
        )
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        fns["cce"] = lambda h, w, y: fused("cce", h, w, y, IGNORE_INDEX)  # the trainer's call
        fns["cce-exact"] = lambda h, w, y: cce(h, w, y, ignore_index=IGNORE_INDEX, filter_eps=None)
    except Exception as e:
        skipped["cce"] = (
            f"cut-cross-entropy does not import ({type(e).__name__}: {e}); pip install cut-cross-entropy==25.1.1"
        )
    return fns, skipped


def inputs(
    n: int, d: int, v: int, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states as after the final RMSNorm (unit scale), the head at init scale (0.02)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=g).to(torch.bfloat16)
    w = (0.02 * torch.randn(v, d, device=device, generator=g)).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device=device, generator=g)
    y[torch.randperm(n, device=device, generator=g)[: n // 100]] = -100  # 1% without a target
    return h.requires_grad_(), w.requires_grad_(), y


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_ms(f: Callable[[], object], device: str) -> float:
    """Milliseconds of f(): CUDA events on the GPU, wall time on the CPU (logic checks only)."""
    if device != "cuda":
        t0 = time.perf_counter()
        f()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    f()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def fwd_bwd(fn: LossFn, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h.grad = w.grad = None
    loss = fn(h, w, y)
    loss.backward()
    return loss


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def measure(fn: LossFn, h, w, y, ref: dict[str, Any], warmup: int, iters: int) -> dict[str, Any]:
    device = h.device.type
    loss = fwd_bwd(fn, h, w, y)  # also the first warm-up (compiles / JITs)
    sync(device)
    r: dict[str, Any] = {
        "loss": float(loss.detach()),
        "loss_rel_err": abs(float(loss.detach()) - ref["loss"]) / abs(ref["loss"]),
        "grad_hidden_rel_err": rel(h.grad, ref["grad_hidden"]),
        "grad_weight_rel_err": rel(w.grad, ref["grad_weight"]),
        "grad_dtypes": f"{str(h.grad.dtype)[6:]}/{str(w.grad.dtype)[6:]}",
    }
    r["correct"] = (
        r["loss_rel_err"] <= LOSS_RTOL
        and r["grad_hidden_rel_err"] <= GRAD_RTOL
        and r["grad_weight_rel_err"] <= GRAD_RTOL
    )
    if not r["correct"]:
        return r  # not timed: a wrong kernel's speed says nothing
    for _ in range(max(0, warmup - 1)):
        fwd_bwd(fn, h, w, y)
    times = [timed_ms(lambda: fwd_bwd(fn, h, w, y), device) for _ in range(iters)]
    r["ms"] = statistics.median(times)
    r["ms_min"] = min(times)
    r["peak_extra_gib"] = float("nan")
    if device == "cuda":
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, h, w, y)
        torch.cuda.synchronize()
        r["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return r


def bench_shape(
    name: str,
    n: int,
    d: int,
    v: int,
    fns: dict[str, LossFn],
    warmup: int,
    iters: int,
    device: str = "cuda",
) -> list[dict[str, Any]]:
    h, w, y = inputs(n, d, v, device)
    loss = fwd_bwd(fns["ours-eager"], h, w, y)  # the reference
    ref = {
        "loss": float(loss.detach()),
        "grad_hidden": h.grad.clone(),
        "grad_weight": w.grad.clone(),
    }
    flops = 6 * n * d * v  # the three head GEMMs (logits, d hidden, d weight)
    out = []
    for cand, fn in fns.items():
        row: dict[str, Any] = {
            "shape": name,
            "tokens": n,
            "hidden": d,
            "vocab": v,
            "candidate": cand,
        }
        t0 = time.perf_counter()
        try:
            row.update(measure(fn, h, w, y, ref, warmup, iters))
        except Exception as e:  # out of memory, an unsupported shape, a kernel error
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row["wall_s"] = time.perf_counter() - t0
        if "ms" in row:
            row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
        out.append(row)
        print(json.dumps(row), flush=True)
        h.grad = w.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    base = next((r["ms"] for r in out if r["candidate"] == "ours" and "ms" in r), None)
    for r in out:
        if base and "ms" in r:
            r["speedup_vs_ours"] = base / r["ms"]
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'shape':5} {'candidate':14} {'loss':>9} {'loss err':>9} {'dh err':>8} {'dW err':>8} "
        f"{'ms':>8} {'TFLOP/s':>8} {'x ours':>7} {'peak GiB':>9}  status"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:5} {r['candidate']:14} failed: {r['error']}")
            continue
        timed = "ms" in r
        lines.append(
            f"{r['shape']:5} {r['candidate']:14} {r['loss']:9.5f} {r['loss_rel_err']:9.1e} "
            f"{r['grad_hidden_rel_err']:8.1e} {r['grad_weight_rel_err']:8.1e} "
            + (
                f"{r['ms']:8.2f} {r['tflops']:8.0f} {r.get('speedup_vs_ours', float('nan')):7.3f} "
                f"{r['peak_extra_gib']:9.2f}  ok ({r['grad_dtypes']})"
                if timed
                else f"{'-':>8} {'-':>8} {'-':>7} {'-':>9}  WRONG: not timed"
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="ref,main", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--tokens", type=int, help="a custom shape: tokens (with --hidden)")
    p.add_argument("--hidden", type=int, help="a custom shape: hidden size (with --tokens)")
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--candidates", help="comma list of candidate names (default: all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: check the script's logic on small shapes (its timings mean nothing)",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_loss.py times CUDA kernels and needs a CUDA GPU, and none is visible "
            "(--device cpu only checks the script's logic)",
            file=sys.stderr,
        )
        return 2
    shapes = (
        {"custom": (args.tokens, args.hidden)}
        if args.tokens and args.hidden
        else {s: SHAPES[s] for s in args.shapes.split(",") if s}
    )
    fns, skipped = candidates()
    for why in skipped.values():
        print(f"note: skipped: {why}", flush=True)
    if args.candidates:
        wanted = args.candidates.split(",")
        fns = {k: f for k, f in fns.items() if k in wanted or k == "ours-eager"}  # the reference
    versions = {"torch": torch.__version__}
    for mod in ("liger_kernel", "cut_cross_entropy", "triton"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod.replace("_", "-"))
        except Exception:
            versions[mod] = None
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{device_name} | {versions} | {time.strftime('%Y-%m-%d')}", flush=True)
    rows = []
    for name, (n, d) in shapes.items():
        rows += bench_shape(name, n, d, args.vocab, fns, args.warmup, args.iters, args.device)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": device_name,
                    "versions": versions,
                    "date": time.strftime("%Y-%m-%d"),
                    "skipped": skipped,
                    "results": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
