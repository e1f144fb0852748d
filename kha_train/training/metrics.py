"""Throughput, MFU and memory figures for the logging steps.

MFU follows torchtitan's convention (``docs/training.md``, NOTES section 6)::

    MFU = tokens/s per GPU * training FLOPs per token / peak bf16 dense FLOP/s of the GPU

where FLOPs per token come from ``kha_train.model.flops.train_flops_per_token`` (6 x active
parameters without the input embedding + 12 x layers x heads x head_dim x seq_len). The peak is
looked up from the GPU name below, or given by ``logging.peak_tflops`` (which also enables MFU on
GPUs missing from the table, and on CPU for experiments).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# Dense bf16 tensor-core peak per GPU, TFLOP/s (vendor datasheets, without sparsity). Matched
# against torch.cuda.get_device_name() by substring, first match wins (longer names first).
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A10G", 70.0),
    ("A6000", 155.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (then MFU is not reported)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory since the last call (GiB): device allocator on CUDA, process RSS on CPU.

    On CUDA also ``alloc_retries``, the allocator's retries since the start (the monitor logs
    each window's): times a cudaMalloc failed and the cache was flushed to retry it. Each one
    synchronises the device (training/device_memory.py).
    """
    gib = 1024**3
    if device.type == "cuda":
        out = {
            "mem_peak_alloc_gib": torch.cuda.max_memory_allocated(device) / gib,
            "mem_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
            "alloc_retries": torch.cuda.memory_stats(device).get("num_alloc_retries", 0),
        }
        torch.cuda.reset_peak_memory_stats(device)
        return out
    # ru_maxrss is KiB on Linux, bytes on macOS; it is a high-water mark of the whole process.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mem_peak_rss_gib": rss / (gib if sys.platform == "darwin" else 1024**2)}


@dataclass
class WindowTimer:
    """Wall time and data-loader wait over the steps between two logging steps.

    The timer is read right after the logging step's host sync, so the window's wall time
    covers the device work of its steps.
    """

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    steps: int = 0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def step(self) -> None:
        self.steps += 1

    def read_and_reset(self) -> tuple[float, float, int]:
        """(elapsed seconds, data-wait seconds, steps) of the window; starts a new window."""
        now = time.perf_counter()
        out = (now - self.start, self.data_wait, self.steps)
        self.start, self.data_wait, self.steps = now, 0.0, 0
        return out


def throughput(
    *,
    elapsed_s: float,
    steps: int,
    tokens_per_step: int,
    world_size: int,
    flops_per_token: float | None,
    peak_flops_per_device: float | None,
) -> dict[str, float]:
    """tokens/s (global and per device), TFLOP/s per device and MFU of a window."""
    if steps == 0 or elapsed_s <= 0:
        return {}
    tps = steps * tokens_per_step / elapsed_s
    out = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / world_size}
    if flops_per_token:
        flops = tps / world_size * flops_per_token
        out["tflops_per_device"] = flops / 1e12
        if peak_flops_per_device:
            out["mfu"] = flops / peak_flops_per_device
    return out


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


@dataclass
class LossWindow:
    """Host sums of the finite steps' loss and grad norm since the last logging step."""

    loss: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    skipped: int = 0
    # The grad norm of each model part (training/grad_parts.py), summed like grad_norm.
    parts: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, grad_norm: float, parts: dict[str, float] | None = None) -> None:
        self.loss += loss
        self.grad_norm += grad_norm
        self.steps += 1
        for k, v in (parts or {}).items():
            self.parts[k] = self.parts.get(k, 0.0) + v

    def means(self) -> dict[str, Any]:
        if not self.steps:
            return {}
        out: dict[str, Any] = {
            "loss": self.loss / self.steps,
            "grad_norm": self.grad_norm / self.steps,
        }
        if self.parts:
            out["grad_norm_parts"] = {k: v / self.steps for k, v in self.parts.items()}
        return out


def train_record(
    *,
    step: int,
    total_steps: int,
    lr: float,
    tokens_per_step: int,
    window: LossWindow,
    elapsed_s: float,
    data_wait_s: float,
    timed_steps: int,
    world_size: int,
    flops_per_token: float | None,
    peak_flops_per_device: float | None,
    device: torch.device,
) -> dict[str, Any]:
    """The record of a logging step: loss, grad norm, lr, throughput, MFU, memory, data wait,
    ETA. Counters and MoE statistics are added by the caller (``monitor.py``)."""
    rec: dict[str, Any] = {"type": "train", "step": step, **window.means(), "lr": lr}
    rec["tokens_seen"] = step * tokens_per_step
    rec.update(
        throughput(
            elapsed_s=elapsed_s, steps=timed_steps, tokens_per_step=tokens_per_step,
            world_size=world_size, flops_per_token=flops_per_token,
            peak_flops_per_device=peak_flops_per_device,
        )
    )  # fmt: skip
    rec.update(memory_stats(device))
    if timed_steps:
        rec["data_wait_s"] = data_wait_s / timed_steps
        rec["data_wait_frac"] = data_wait_s / elapsed_s if elapsed_s > 0 else 0.0
        rec["eta_s"] = (total_steps - step) * elapsed_s / timed_steps
    return rec


def moe_record(counts: torch.Tensor) -> dict[str, Any]:
    """Per-layer expert load of one step's counts [n_moe_layers, E] (summed over ranks)."""
    from kha_train.model import load_stats

    stats = {k: v.tolist() for k, v in load_stats(counts).items()}
    out: dict[str, Any] = {f"moe_{k}": v for k, v in stats.items()}
    out["moe_max_violation_mean"] = sum(stats["max_violation"]) / len(stats["max_violation"])
    out["moe_dead_experts_total"] = int(sum(stats["dead_experts"]))
    return out


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """Scalar view of a record: numbers kept, lists expanded to ``key/layer_i``, dicts of
    numbers to ``key/name`` (``grad_norm_parts/experts``), the rest dropped."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, (bool, int, float)):
            out[k] = float(v)
        elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            for i, x in enumerate(v):
                out[f"{k}/layer_{i}"] = float(x)
        elif isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()):
            for name, x in v.items():
                out[f"{k}/{name}"] = float(x)
    return out


def metric_prefix(record: dict[str, Any]) -> str:
    """The W&B / TensorBoard namespace of a record's metrics: val/, eval/ or train/."""
    return {"val": "val/", "eval": "eval/"}.get(record.get("type", ""), "train/")
