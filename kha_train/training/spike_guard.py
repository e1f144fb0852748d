"""Skip-step: an optimizer step whose loss or gradient norm spikes is not applied.

Decided on the device without a host sync, like the non-finite skip (``step.py``), with the
defaults of OLMo-core's skip-step AdamW (``optim.skip_step``, ``kha_train/config/optim.py``)::

    window = loss and global grad norm (before clipping) of the last ``window`` applied steps,
             a ring buffer on the device; skipped and non-finite steps never enter it
    spike  = the step is finite, the window holds >= ``min_history`` values, and for the loss
             or the grad norm: value > mean + z_threshold x std of the window (std with n - 1,
             std > 0); the same test as the logged spike detector (``spikes.py``)
    skip   = spike, unless ``max_in_row`` spikes were skipped in a row just before: then this
             step is applied and the window starts over (a "reset", logged)
    ok     = finite and not skip: AdamW's found_inf, the MoE bias update, the clip state

Why applied steps only: a spike kept in the window inflates its std for ``window`` steps and
hides the next ones (OLMo-core keeps every value, so there one NaN also blocks the window). The
price: a lasting change of level would be skipped forever, because the weights do not move
during a streak of skips and every batch then looks alike. Hence ``max_in_row``: after that many
in a row the guard gives in, applies the step and restarts its statistics (no skipping for the
next ``min_history`` steps). Rolling back to a checkpoint is the better answer there: a
:data:`RESET` step counts as a spiking step for ``train.rollback`` (rollback.py).

A skipped step leaves untouched: parameters, both AdamW moments and its step count, the MoE
expert biases, and the adaptive-clipping state (``clipping.py``). It does advance the trainer's
step, so the learning-rate schedule, tokens seen and the data position move on: the batch is
consumed and dropped (as in OLMo-core, whose trainer step also advances).

The verdict of each step (:class:`Verdict`: the ok flag, :data:`NONFINITE` / :data:`LOSS_SPIKE`
/ :data:`GRAD_NORM_SPIKE` / :data:`RESET` flags, both z-scores) goes into the step's
:class:`~kha_train.training.step.StepResult`; the monitor logs it at the next drain. The guard's
state is checkpointed in the trainer state (JSON; the window is float64 and round-trips
exactly), so a resumed run skips what the uninterrupted one would have. Every rank computes the
same verdict: loss and grad norm are all-reduced values, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kha_train.config import SkipStepConfig

NONFINITE = 1  # loss or grad norm not finite: skipped (and never observed)
LOSS_SPIKE = 2  # the loss is a spike
GRAD_NORM_SPIKE = 4  # the grad norm is a spike
RESET = 8  # a spike applied after max_in_row skipped ones; the window started over
METRIC_FLAGS = (("loss", LOSS_SPIKE), ("grad_norm", GRAD_NORM_SPIKE))


def spike_metrics(flags: int) -> list[str]:
    """The metrics that spiked in a step with these flags (host side)."""
    return [name for name, bit in METRIC_FLAGS if flags & bit]


def skipped_for_spike(flags: int) -> bool:
    """Whether a step with these flags was skipped as a spike (host side)."""
    return bool(flags & (LOSS_SPIKE | GRAD_NORM_SPIKE)) and not flags & (RESET | NONFINITE)


@dataclass
class Verdict:
    """What the guard decided for one step, on the device."""

    ok: torch.Tensor  # () bool: the update is applied
    flags: torch.Tensor  # () int32: NONFINITE | LOSS_SPIKE | GRAD_NORM_SPIKE | RESET
    z: torch.Tensor  # (2,) fp32: z of the loss and of the grad norm (0 without statistics)


def finite_verdict(loss: torch.Tensor, grad_norm: torch.Tensor) -> Verdict:
    """The verdict without a guard: apply every finite step."""
    ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
    return Verdict(ok, (~ok).int() * NONFINITE, torch.zeros(2, device=loss.device))


class SpikeGuard:
    """Skips steps whose loss or grad norm spikes (module docstring). All state on the device."""

    def __init__(self, cfg: SkipStepConfig, device: torch.device) -> None:
        self.window, self.z_threshold = cfg.window, cfg.z_threshold
        self.min_history, self.max_in_row = cfg.min_history, cfg.max_in_row
        self.values = torch.zeros(2, cfg.window, dtype=torch.float64, device=device)  # ring
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # applied since a reset
        self.in_row = torch.zeros((), dtype=torch.int64, device=device)  # spikes skipped in a row
        self._slots = torch.arange(cfg.window, device=device)

    @torch.no_grad()
    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> Verdict:
        """Decide on this step's loss and grad norm and update the window. Device ops only."""
        x = torch.stack([loss.detach(), grad_norm.detach()]).to(torch.float64)  # (2,)
        finite = torch.isfinite(x).all()
        n = self.count.clamp(max=self.window)
        valid = self._slots < n  # (W,) the slots holding values
        nf = n.to(torch.float64)
        mean = torch.where(valid, self.values, 0.0).sum(1) / nf.clamp(min=1)  # (2,)
        dev = torch.where(valid, self.values - mean[:, None], 0.0)  # (2, W)
        std = (dev.square().sum(1) / (nf - 1).clamp(min=1)).sqrt()  # (2,) sample std
        stats = finite & (n >= 2) & (std > 0)
        z = torch.where(stats, (x - mean) / std, 0.0)
        spike = stats & (n >= self.min_history) & (x > mean + self.z_threshold * std)  # (2,)
        any_spike = spike.any()
        give_in = any_spike & (self.in_row >= self.max_in_row)
        skip = any_spike & ~give_in
        ok = finite & ~skip

        self.in_row.copy_(torch.where(skip, self.in_row + 1, torch.where(ok, 0, self.in_row)))
        count = torch.where(give_in, 0, self.count)  # a reset empties the window first
        slot = (count % self.window).view(1)
        kept = self.values.index_select(1, slot)  # (2, 1)
        self.values.index_copy_(1, slot, torch.where(ok, x.view(2, 1), kept))
        self.count.copy_(count + ok.long())

        flags = (
            (~finite).int() * NONFINITE
            + spike[0].int() * LOSS_SPIKE
            + spike[1].int() * GRAD_NORM_SPIKE
            + give_in.int() * RESET
        )
        return Verdict(ok, flags, z.float())

    # -- checkpoint state (host syncs: called at checkpoints only) --------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "values": self.values.tolist(),
            "count": int(self.count.item()),
            "in_row": int(self.in_row.item()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly; with another ``window``, keep the newest values that fit."""
        values = torch.tensor(state["values"], dtype=torch.float64)
        count, old = int(state["count"]), int(state["window"])
        if old != self.window:
            n = min(count, old)
            order = [(count - n + j) % old for j in range(n)]  # oldest first
            newest = values[:, order][:, max(0, n - self.window) :]
            values = torch.zeros(2, self.window, dtype=torch.float64)
            values[:, : newest.shape[1]] = newest
            count = newest.shape[1]
        self.values.copy_(values)
        self.count.fill_(count)
        self.in_row.fill_(int(state["in_row"]))


def build_guard(cfg: SkipStepConfig, device: torch.device) -> SpikeGuard | None:
    """The guard of ``optim.skip_step`` (None when it is off)."""
    return SpikeGuard(cfg, device) if cfg.enabled else None
