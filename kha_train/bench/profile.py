"""Where a step's GPU time goes: a PyTorch profiler trace of a few steps, each kernel's time
put in a category (attention, expert GEMMs, MoE dispatch, dense GEMMs, LM head + loss, optimizer,
FSDP copies, other)."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import kha_train.model.transformer as transformer
from kha_train.bench.timing import sync
from kha_train.bench.workload import Workload

# Step time is split by where each GPU kernel came from. Two CPU-side scopes are found on the
# stack of ops enclosing the kernel's launch: the optimizer (grad clipping and AdamW) and the LM
# head + loss (a profiler range the benchmark puts around the model's loss call). Inside
# compiled blocks ops have no names of their own, so the rest is split by kernel name.
STACK_CATEGORIES = [
    ("optimizer", ("optimizer.step", "optimizer.zero_grad", "adamw", "clip_grad", "_foreach_norm")),
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
    sync()
    loss_fn = transformer.lm_head_loss

    def labelled_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.profiler.record_function("lm_head+loss"):
            return loss_fn(*args, **kwargs)

    transformer.lm_head_loss = labelled_loss  # the loss's work is all in its forward
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                w.step()
            sync()
    finally:
        transformer.lm_head_loss = loss_fn
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
