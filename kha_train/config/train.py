"""The ``train`` section: the run's length, batch, precision, device and spike rollbacks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass
class RollbackConfig:
    """Roll back to the last checkpoint before persistent spikes, skip their data and go on, in
    the same process, on every rank (training/rollback.py; docs/training.md, "Spike defenses").
    Triggers are evaluated at drains (logging steps, and before checkpoints), from the global
    per-step loss, grad norm and spike-guard verdicts, so every rank decides alike. With no
    checkpoint before the spike window, the trigger is logged (rollback_unavailable) and
    training goes on."""

    enabled: bool = False  # the paper configs turn it on
    # Trigger 1: at least max_spikes spiking steps among the last `window` steps. A spiking step
    # is non-finite, skipped or applied-after-a-streak by the spike guard (optim.skip_step), or
    # flagged by the logged detector (logging.spikes). 0: off.
    max_spikes: int = 8
    window: int = 128  # steps over which spiking steps are counted
    # Trigger 2: the smoothed loss (an EMA over applied steps) stays above (1 + loss_rise) x its
    # lowest value so far for loss_rise_steps applied steps in a row; the window then starts
    # after the step of that lowest value. A fraction (0.1: 10% above); 0: off.
    loss_rise: float = 0.0
    loss_rise_steps: int = 100  # K: applied steps in a row above the margin
    loss_smoothing: float = 0.99  # EMA factor of the smoothed loss (about 1 / (1 - x) steps)
    loss_rise_warmup: int = 1000  # applied steps before trigger 2 is armed (fast early descent)
    # What a rollback does: restore the newest checkpoint before the window's first step, skip
    # the batches of the window (its first step to the step that triggered) plus skip_margin
    # more global batches after them, and train on from the checkpoint's step.
    skip_margin: int = 0
    lr_factor: float = 1.0  # learning rate x this for lr_steps steps after each rollback
    lr_steps: int = 0  # 0: the schedule is unchanged
    # A trigger after this many rollbacks stops the run with an error (exit code != 0), leaving
    # every checkpoint in place. 0: stop at the first trigger (detect only).
    max_rollbacks: int = 3


class Precision(enum.StrEnum):
    bf16 = "bf16"  # bf16 compute, fp32 master weights, fp32 gradient reduction
    fp32 = "fp32"  # everything fp32 (CPU tests, exact-resume checks)
    # bf16 as above, with the GEMMs of the large dense projections in FP8 (torchao float8
    # training; parallel.fp8 says which and how). Needs torchao (pip install 'kha-train[fp8]')
    # and a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell). Checkpoints are the same
    # as bf16's: a run can resume across bf16 and fp8.
    fp8 = "fp8"


@dataclass
class TrainConfig:
    global_batch_tokens: int = 65536  # tokens per optimizer step across all ranks
    micro_batch_size: int = 4  # samples per rank per forward/backward
    max_steps: int | None = None  # optimizer steps; exactly one of max_steps / total_tokens
    total_tokens: int | None = None  # training length in tokens (steps = total // batch)
    seed: int = 0  # model init and dropout-free RNG streams
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    precision: Precision = Precision.bf16
    val_every: int = 0  # validation every N steps (0: only at the end, if a val split exists)
    val_batches: int = 8  # micro-batches per validation pass (0 with val_every=0: no validation)
    max_nonfinite_in_row: int = 5  # abort after this many consecutive non-finite steps
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    # Bitwise-reproducible runs on one GPU type: torch's deterministic kernels, a fixed cuBLAS
    # workspace, no cuDNN autotuning (training/determinism.py; the cost: docs/training.md).
    deterministic: bool = False
