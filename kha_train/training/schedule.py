"""Learning-rate schedules: pure functions of the optimizer step.

``step`` is the 0-based index of the optimizer step about to be taken, so step 0 uses
``lr_at(0, ...)``. Every schedule starts with a linear warmup that reaches the peak on the last
warmup step, then:

- cosine:   peak -> min_lr_ratio * peak along half a cosine, reaching the floor on the last step
            (the paper: 5% warmup, cosine to 10%).
- constant: stays at the peak.
- wsd:      warmup-stable-decay: peak until the last ``decay_fraction`` of the steps, then linear
            to the floor, reaching it on the last step.

Steps past ``total_steps`` (a run extended beyond its plan) stay at the final value.
"""

from __future__ import annotations

import math

from kha_train.config import ScheduleConfig, ScheduleKind


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    """Warmup length in steps: ``warmup_steps`` if set, else ``warmup_fraction`` of the run."""
    if cfg.warmup_steps is not None:
        return max(0, min(cfg.warmup_steps, total_steps))
    return round(cfg.warmup_fraction * total_steps)


def lr_at(step: int, *, peak_lr: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    floor = cfg.min_lr_ratio * peak_lr
    last = total_steps - 1  # the step that reaches the floor
    match cfg.kind:
        case ScheduleKind.constant:
            return peak_lr
        case ScheduleKind.cosine:
            progress = _progress(step, start=warmup, end=last)
            return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        case ScheduleKind.wsd:
            decay = round(cfg.decay_fraction * total_steps)
            if decay == 0:  # decay_fraction=0: no decay phase at all
                return peak_lr
            decay_start = max(warmup, total_steps - decay)  # first step below the peak
            if step < decay_start:
                return peak_lr
            # Linear: the first decay step is one notch below the peak, the last is the floor.
            progress = min(1.0, (step - decay_start + 1) / max(1, last - decay_start + 1))
            return peak_lr + (floor - peak_lr) * progress
    raise ValueError(f"unknown schedule.kind {cfg.kind!r}")


def _progress(step: int, *, start: int, end: int) -> float:
    """Fraction of the way from ``start`` to ``end`` (clamped to [0, 1])."""
    if end <= start:
        return 1.0
    return min(1.0, max(0.0, (step - start) / (end - start)))
