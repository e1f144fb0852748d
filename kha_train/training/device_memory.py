"""When a run meets the edge of GPU memory: what it says and what it suggests.

Two cases, both with the fixes that fit the run's own settings:
- the CUDA allocator had to flush its cache and retry a cudaMalloc (the run goes on, slower:
  each retry synchronises the device; benchmark rows with 6 retries took 23-41% longer than their
  GPU time on one H200, docs/performance.md): one warning per run (``monitor.py``);
- the allocation failed (torch.OutOfMemoryError): the run ends with an ``out_of_memory`` record
  and :class:`OutOfDeviceMemoryError`, whose message names the step, the memory, the last
  checkpoint and the fixes (``trainer.py``). Nothing is saved after the failure: the model and
  optimizer may be half-way through a step.

Both are rank 0's view: its allocator's retries, and its record. A rank that runs out of memory
prints the error and exits; torchrun then stops the others (rank 0 writes no end record then).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kha_train.config import ACMode, Config, LossKernel
from kha_train.training.parallel import reshards_after_forward


def default_allocator_config() -> None:
    """Expandable segments unless the user configured the allocator: less fragmentation near
    full memory, where the allocator would otherwise flush its cache and retry. Read when
    CUDA's allocator starts, so call it before any CUDA work. torch >= 2.9 reads
    ``PYTORCH_ALLOC_CONF`` and falls back to the older ``PYTORCH_CUDA_ALLOC_CONF``; a value in
    either wins."""
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


class OutOfDeviceMemoryError(RuntimeError):
    """The GPU ran out of memory during a run; the message says what to change."""


def memory_fixes(cfg: Config, world_size: int) -> list[str]:
    """The settings that lower a rank's peak memory, most effective first, leaving out what the
    run does already (docs/performance.md measured them on the paper's main model)."""
    p, fixes = cfg.parallel, []
    if p.activation_checkpointing in (ACMode.none, ACMode.every_n):
        fixes.append(
            "parallel.activation_checkpointing=selective (keeps the matrix products' outputs, "
            "recomputes the rest; full keeps only each block's input)"
        )
    elif p.activation_checkpointing == ACMode.selective:
        fixes.append("parallel.activation_checkpointing=full (keeps only each block's input)")
    if p.single_device:
        fixes.append(
            "parallel.single_device=false with parallel.reshard_after_forward=true (FSDP2 "
            "frees the bf16 weights between forward and backward; single_device keeps them and "
            "its gradient buffer allocated all step)"
        )
    elif not reshards_after_forward(p, world_size):
        fixes.append(
            "parallel.reshard_after_forward=true (frees the gathered bf16 weights between "
            "forward and backward)"
        )
    if cfg.train.micro_batch_size > 1:
        accum = cfg.train.global_batch_tokens // (
            cfg.train.micro_batch_size * cfg.data.seq_len * world_size
        )
        fixes.append(
            f"a smaller train.micro_batch_size (now {cfg.train.micro_batch_size}; the step keeps "
            "its train.global_batch_tokens with more micro-batches"
            + (
                ", and from one micro-batch to several it also keeps an fp32 gradient "
                "(4 bytes per parameter) between them: the main model's peak rose from 8 x 1 to "
                "4 x 2 on one H200)"
                if accum == 1
                else ")"
            )
        )
    if p.loss_kernel == LossKernel.chunked:
        fixes.append("parallel.loss_kernel=cce (the LM head's logits never whole; slower)")
    fixes.append(
        "more GPUs (FSDP divides the fp32 weights, gradients and AdamW moments, 16 bytes per "
        "parameter, among them)"
    )
    return fixes


def alloc_retry_warning(retries: int, cfg: Config, world_size: int) -> str:
    """The one warning of a run whose allocator flushed its cache to allocate."""
    return (
        f"warning: the CUDA allocator ran out of cached memory and retried {retries} time(s): "
        "each retry synchronises the device, and steps slow down (benchmark rows with 6 retries "
        "took 23-41% longer than their GPU time on one H200, docs/performance.md). Try "
        + "; or ".join(memory_fixes(cfg, world_size))
        + "."
    )


def out_of_memory_message(
    error: BaseException,
    cfg: Config,
    world_size: int,
    step: int,
    device: torch.device,
    last_checkpoint: Path | None,
) -> str:
    """What ran out, where, and what to change (then resume from the last checkpoint)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lines = [f"out of GPU memory after {step} completed step(s): {first}"]
    if device.type == "cuda":
        gib = 2**30
        total = torch.cuda.get_device_properties(device).total_memory / gib
        peak = torch.cuda.max_memory_allocated(device) / gib
        lines.append(
            f"peak allocated since the last logged step {peak:.1f} GiB of the device's "
            f"{total:.1f} GiB"
        )
    lines.append(
        "nothing was saved after the failure; "
        + (
            f"the last checkpoint, {last_checkpoint}, is intact: after the change, "
            "checkpoint.resume=auto continues from it"
            if last_checkpoint is not None
            else "no published checkpoint was found"
        )
    )
    lines.append("to fit, try: " + "; or ".join(memory_fixes(cfg, world_size)))
    lines.append("`kha-train info CONFIG` estimates the memory per GPU of each setting")
    return "\n  ".join(lines)
