"""One optimizer step, the same for the trainer and the benchmark: ``train_step(...)``.

    micro-batches of this rank                  (loader.next_step(): one global batch / ranks)
    for each: loss_i = compute_loss(batch_i);  backward(loss_i * w_i)
        w_i = n_i * ranks / N with n_i the micro-batch's target tokens and N those of the global
        batch: FSDP averages gradients over ranks, so the step's gradient is exactly that of the
        mean loss over every target token of the global batch (= 1 / micro-batches when, as
        with the packed loader, every position has a target)
    loss  = sum over ranks of sum_i loss_i * w_i / ranks       (all-reduce on the device)
    gnorm = global gradient norm (before clipping)
    ok    = loss and gnorm are finite, and, with a spike guard, not a spike (a device tensor;
            ``spike_guard.py``)
    clip  (``clipping.py``: global norm to grad_clip by default, or ZClip / AdaGC, whose state
            moves only if ok)
    AdamW step at ``lr``, applied only if ok (see "non-finite steps")
    MoE: counts of the step (all micro-batches) summed over ranks -> expert-bias update (if ok)

Gradients are reduced (and parameters resharded) only after the last micro-batch when
``parallel.defer_grad_sync`` says so (:func:`~kha_train.training.parallel.set_micro_batch_sync`).
With ``parallel.single_device`` (no FSDP2) the optimizer accumulates them in fp32 instead
(:func:`~kha_train.training.optim.begin_micro_batch`).

No host-device sync: loss, grad norm, the ok flag, the skip flags and the counts come back as
device tensors (:class:`StepResult`); the trainer keeps them in a small history buffer until a
logging step.

Non-finite steps: with the fused AdamW (the default on CUDA) the flag goes in as the kernel's
``found_inf`` argument: the kernel leaves parameters, both moments and the step count untouched
when it is set, decided on the device, no sync. The foreach implementation has no such input, so
there the flag is read on the host once per step (free on CPU; a sync per step on GPU, so prefer
fused there). The MoE bias update gets counts x ok, and a step with zero counts does not move
the bias. A step skipped by the spike guard takes the same path (ok is false).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from kha_train.config import ParallelConfig
from kha_train.data.loader import Batch
from kha_train.model import collect_expert_counts, moe_layers, update_expert_bias
from kha_train.model.loss import IGNORE_INDEX
from kha_train.training.clipping import Clipper, GlobalNormClip
from kha_train.training.fp8 import precompute_fp8_scales
from kha_train.training.grad_parts import GradParts
from kha_train.training.optim import (
    begin_micro_batch,
    end_micro_batch,
    global_grad_norm,
    is_fused,
    set_lr,
)
from kha_train.training.parallel import set_micro_batch_sync
from kha_train.training.spike_guard import NONFINITE, SpikeGuard, finite_verdict

LossFn = Callable[[Batch], torch.Tensor]


@dataclass
class StepResult:
    """What one optimizer step leaves on the device (all global: the same on every rank)."""

    loss: torch.Tensor  # () fp32: mean loss over every target token of the global batch
    grad_norm: torch.Tensor  # () global gradient norm, before clipping
    ok: torch.Tensor  # () bool: the update was applied (finite, and not skipped as a spike)
    counts: torch.Tensor | None  # (n_moe_layers, E) expert assignments of the step; None: dense
    # () int32: why the step was skipped, spike_guard.NONFINITE | LOSS_SPIKE | GRAD_NORM_SPIKE,
    # and RESET (a spike applied after max_in_row skipped ones); 0: a normal step
    flags: torch.Tensor
    z: torch.Tensor  # (2,) fp32: the guard's z-scores of loss and grad norm (0 without a guard)
    # (parts,) fp32: the grad norm of each part of the model (grad_parts.py); None: not asked for
    grad_parts: torch.Tensor | None = None

    @property
    def finite(self) -> torch.Tensor:
        """() bool: loss and grad norm were finite."""
        return (self.flags & NONFINITE) == 0


def token_weights(micro_batches: Sequence[Batch], world_size: int) -> torch.Tensor:
    """w_i = n_i * ranks / N for each micro-batch (see the module docstring): (A,) fp32."""
    n_tok = torch.stack([(b.labels != IGNORE_INDEX).sum() for b in micro_batches]).float()  # (A,)
    total = n_tok.sum()
    if world_size > 1:
        dist.all_reduce(total)
    return n_tok * world_size / total


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    *,
    parallel: ParallelConfig,
    grad_clip: float,
    lr: float,
    compute_loss: LossFn | None = None,
    guard: SpikeGuard | None = None,
    clipper: Clipper | None = None,
    parts: GradParts | None = None,
) -> StepResult:
    """One optimizer step of ``model`` on this rank's ``micro_batches`` (module docstring).

    ``compute_loss(batch)`` is the micro-batch's scalar loss, by default
    ``model(batch.input_ids, batch.labels)`` (the trainer passes its overridable hook, the
    benchmark its autocast baseline). ``clipper`` (``clipping.py``) defaults to global-norm
    clipping to ``grad_clip`` (<= 0: none); ``guard`` (``spike_guard.py``), if given, skips
    spikes; ``parts`` (``grad_parts.py``), if given, splits the gradient norm by model part."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    # FP8 all-gather (parallel.fp8): the weights' scales, after the last optimizer step or any
    # load or rollback that changed them; a no-op for every other model (training/fp8.py).
    precompute_fp8_scales(model)
    weights = token_weights(micro_batches, world)  # (A,)
    loss_sum = torch.zeros((), device=weights.device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        set_micro_batch_sync(model, parallel, last=i == last)
        begin_micro_batch(optimizer, i, len(micro_batches))
        loss = model(batch.input_ids, batch.labels) if compute_loss is None else compute_loss(batch)
        (loss * weights[i]).backward()
        end_micro_batch(optimizer)
        loss_sum += loss.detach().float() * weights[i]
    if world > 1:
        dist.all_reduce(loss_sum)
    loss = loss_sum / world  # the global batch's mean loss

    if parts is None:
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm, part_norms = global_grad_norm(params), None
    else:  # the same norm, from the per-tensor norms, split by part on the way
        params = parts.params
        grad_norm, part_norms = parts.norms()
    verdict = finite_verdict(loss, grad_norm) if guard is None else guard.step(loss, grad_norm)
    ok = verdict.ok
    (clipper or GlobalNormClip(grad_clip)).clip(optimizer, params, grad_norm, ok)

    set_lr(optimizer, lr)
    if is_fused(optimizer):
        optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]  # 1: kernel skips
        optimizer.step()
    elif ok.item():  # foreach has no device-side skip: one host read per step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    counts = None
    if moe_layers(model):
        counts = collect_expert_counts(model)  # (n_moe_layers, E), this rank
        if world > 1:
            dist.all_reduce(counts)
        update_expert_bias(model, counts * ok)  # zero counts: bias unchanged
    return StepResult(loss, grad_norm, ok, counts, verdict.flags, verdict.z, part_norms)
