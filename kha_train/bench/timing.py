"""Timing a workload on the GPU: warm-up, a check that the step never syncs with the host,
CUDA-event timing of full optimizer steps, and the card's clock / throttle state around it."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import torch

from kha_train.bench.workload import Workload
from kha_train.model.flops import train_flops_per_token


def gpu_state() -> str:
    """SM clock / max, temperature, power and active throttle reasons (nvidia-smi), to tell
    a throttled card from a slow change."""
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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_workload(w: Workload) -> dict[str, Any]:
    """Step time, tokens/s, TFLOP/s, MFU and peak memory over ``w.s.steps`` timed steps, then
    (``sync_check``) one more step under ``set_sync_debug_mode("error")``: ``sync_check`` in the
    result is "ok", or the error a host-device synchronisation inside the step raised (after
    the timing, so that such a finding does not cost the measurement)."""
    s = w.s
    first = None  # the first step's result: its loss is the initial model's (numerics check)
    for _ in range(s.warmup):
        r = w.step()
        first = r if first is None else first
    sync()
    torch.cuda.reset_peak_memory_stats()
    retries_before = _alloc_retries()
    state_before = gpu_state()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(s.steps):
        result = w.step()
        first = result if first is None else first
    end.record()
    sync()
    wall = time.perf_counter() - t0
    retries_timed = _alloc_retries() - retries_before
    state_after = gpu_state()
    step_ms = start.elapsed_time(end) / s.steps
    tokens = s.micro_batch * s.seq_len * s.accum
    fpt = train_flops_per_token(w.cfg, s.seq_len)
    tps = tokens / (step_ms / 1e3)
    check = "skipped"
    if s.sync_check and torch.cuda.is_available():
        # Any host-device synchronisation inside a step raises here.
        torch.cuda.set_sync_debug_mode("error")
        try:
            w.step()
            check = "ok"
        except RuntimeError as e:
            check = f"error: {str(e).splitlines()[0][:300]}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sync()
    return {
        "sync_check": check,
        "step_ms": step_ms,
        "wall_step_ms": wall / s.steps * 1e3,
        "tokens_per_s": tps,
        "tflops": tps * fpt / 1e12,
        "mfu": tps * fpt / (s.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        # cudaMalloc retries mean the allocator ran out of cached blocks: slow, and it syncs.
        # Since the process started (warm-up and compile included), and in the timed steps.
        "alloc_retries": _alloc_retries(),
        "alloc_retries_timed": retries_timed,
        "loss": float(result.loss),
        "first_loss": float(first.loss),
        "gpu_before": state_before,
        "gpu_after": state_after,
    }


def _alloc_retries() -> int:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0)
