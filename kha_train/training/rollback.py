"""Automatic rollback when spikes persist (``train.rollback``; docs/training.md, "Spike defenses").

The trigger, evaluated at drains (logging steps, and before every checkpoint save)::

    every step   the step's global loss, grad norm and spike-guard flags are appended to a list
                 on the device (:meth:`Rollbacks.record`: no host sync)
    a drain      reads the list in one transfer (right after the monitor's, so the device is
                 idle by then) and feeds each step, in order, to the trigger (:meth:`observe`)
    spiking      a step that was non-finite, skipped by the spike guard or applied by it after
                 a streak (``optim.skip_step``), or flagged by the logged detector's test
                 (``logging.spikes``, repeated here on the same values: the steps the ``spike``
                 records name)
    trigger 1    >= ``max_spikes`` spiking steps within the last ``window`` steps; the spike
                 window starts at the oldest of them
    trigger 2    the smoothed loss (an EMA over applied steps) above (1 + ``loss_rise``) x its
                 lowest value since ``loss_rise_warmup`` applied steps, for ``loss_rise_steps``
                 applied steps in a row; the window starts after the step of the lowest value

Every rank computes the same decision (the values are global, all-reduced); :func:`agree`
checks that with one host all-reduce before anything is done. The host detector only runs at
drains, so a trigger is seen at the next logging step (or checkpoint) after it happened, and the
window then runs to that step: its batches were all consumed.

A rollback (``Trainer._roll_back``): the newest checkpoint saved before the window's first step
is loaded (model, optimizer, RNG, and the trainer state: step, data position, spike detector,
spike guard, clipper, this trigger's state), the checkpoints after it are deleted (they hold
abandoned steps), the data loader skips the global samples the window's steps took plus
``skip_margin`` more batches (a skip range of the loader, checkpointed with it), the learning
rate is multiplied by ``lr_factor`` for ``lr_steps`` steps, and training goes on from the
checkpoint's step. The list of rollbacks and the skip ranges are not taken from the checkpoint
but carried over from the live run, so a later rollback to the same checkpoint counts them all
and skips both windows. After ``max_rollbacks`` rollbacks the next trigger stops the run
(:class:`RollbackLimitError`); with no checkpoint before the window the trigger is logged
(``rollback_unavailable``), its window cleared, and training goes on.

The run's logs stay one timeline: at a rollback, rank 0 moves every record of the abandoned
steps (step > the checkpoint's) from ``metrics.jsonl`` and ``spikes.jsonl`` to
``rolled_back.jsonl`` (each tagged ``rolled_back_by``: the rollback's number), then logs the
``rollback`` record at the checkpoint's step. A resume drops what a later rollback wrote
(:func:`trim_logs`), so a resumed run logs what the uninterrupted one did.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kha_train.config import RollbackConfig, SpikeConfig
from kha_train.training import distributed as D
from kha_train.training.spike_guard import (
    GRAD_NORM_SPIKE,
    LOSS_SPIKE,
    NONFINITE,
    RESET,
    skipped_for_spike,
)
from kha_train.training.spikes import SpikeDetector
from kha_train.training.step import StepResult

ROLLED_BACK = "rolled_back.jsonl"
LOGS = ("metrics.jsonl", "spikes.jsonl")


class RollbackLimitError(RuntimeError):
    """Spikes persisted after ``train.rollback.max_rollbacks`` rollbacks."""


@dataclass
class Decision:
    """A trigger that fired: roll back to before ``first_step``."""

    reason: str  # "spikes" | "loss_rise"
    first_step: int  # the first step of the spike window (1-based)
    step: int  # the step at which the trigger fired
    detail: dict[str, Any] = field(default_factory=dict)  # logged with the rollback

    def describe(self) -> str:
        d = self.detail
        if self.reason == "spikes":
            return (
                f"{len(d['spiking_steps'])} spiking steps within {d['within_steps']} steps "
                f"(steps {d['spiking_steps'][0]}-{d['spiking_steps'][-1]})"
            )
        return (
            f"smoothed loss {d['smoothed_loss']:.4g} above (1 + {d['loss_rise']:g}) x its low "
            f"{d['low']:.4g} (step {d['low_step']}) for {d['steps_above']} steps"
        )


class Rollbacks:
    """The trigger state, the list of rollbacks done, and the learning-rate factor after one.

    The trigger runs only with ``enabled``; the list and the lr factor are kept (and applied)
    either way, so a resume with rollback off keeps what earlier rollbacks set."""

    def __init__(self, cfg: RollbackConfig, spikes: SpikeConfig) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.history: list[dict[str, Any]] = []  # every rollback of the run (their records)
        self.lr_factor, self.lr_until = 1.0, 0  # lr x factor for steps before lr_until (0-based)
        self._spike_cfg = spikes
        self._pending: list[torch.Tensor] = []  # (3,) per step: loss, grad norm, guard flags
        self._first_pending = 0  # the step of _pending[0]
        self.decision: Decision | None = None  # fired at a drain, not yet acted on
        self._reset_trigger()

    def _reset_trigger(self) -> None:
        sp = self._spike_cfg
        # The logged detector's test on the same values (its state restores from the monitor's).
        self.detector = SpikeDetector(sp.window, sp.z_threshold, sp.warmup)
        self.spiking: deque[int] = deque()  # spiking steps of the last `window` steps
        self.ema: float | None = None  # smoothed loss over applied steps
        self.applied = 0  # applied (finite, not skipped) steps seen by the EMA
        self.low: float | None = None  # the EMA's lowest value once armed
        self.low_step = 0
        self.above = 0  # applied steps in a row with the EMA above the margin

    # -- per step and at drains ------------------------------------------------------------------

    def record(self, step: int, result: StepResult) -> None:
        """Keep optimizer step ``step`` (1-based) on the device until the next drain."""
        if not self.enabled:
            return
        if not self._pending:
            self._first_pending = step
        flags = result.flags.to(torch.float32)
        self._pending.append(torch.stack([result.loss.float(), result.grad_norm.float(), flags]))

    def observe(self) -> Decision | None:
        """Read the steps recorded since the last drain (one host read) and update the trigger;
        the first decision that fires is kept in :attr:`decision` until taken."""
        if not self._pending:
            return self.decision
        rows = torch.stack(self._pending).tolist()
        first, self._pending = self._first_pending, []
        for j, (loss, grad_norm, flags) in enumerate(rows):
            fired = self._observe_step(first + j, loss, grad_norm, int(flags))
            if self.decision is None:
                self.decision = fired
        return self.decision

    def take_decision(self) -> Decision | None:
        decision, self.decision = self.decision, None
        return decision

    def _observe_step(
        self, step: int, loss: float, grad_norm: float, flags: int
    ) -> Decision | None:
        cfg = self.cfg
        spiking = bool(flags & (NONFINITE | LOSS_SPIKE | GRAD_NORM_SPIKE))
        if not flags & NONFINITE:  # as the monitor feeds its detector
            skipped = skipped_for_spike(flags)
            flagged = self.detector.observe(
                step, loss, grad_norm, accepted=not skipped, restart=bool(flags & RESET)
            )
            spiking = spiking or bool(flagged)
            if not skipped:
                self._smooth(step, loss)
        if spiking:
            self.spiking.append(step)
        while self.spiking and self.spiking[0] <= step - cfg.window:
            self.spiking.popleft()
        if cfg.max_spikes and len(self.spiking) >= cfg.max_spikes:
            steps = list(self.spiking)
            detail = {"spiking_steps": steps, "within_steps": cfg.window}
            return Decision("spikes", steps[0], step, detail)
        if cfg.loss_rise and self.above >= cfg.loss_rise_steps:
            assert self.ema is not None and self.low is not None
            detail = {
                "smoothed_loss": self.ema, "low": self.low, "low_step": self.low_step,
                "loss_rise": cfg.loss_rise, "steps_above": self.above,
            }  # fmt: skip
            return Decision("loss_rise", self.low_step + 1, step, detail)
        return None

    def _smooth(self, step: int, loss: float) -> None:
        beta = self.cfg.loss_smoothing
        self.ema = loss if self.ema is None else beta * self.ema + (1 - beta) * loss
        self.applied += 1
        if self.applied < self.cfg.loss_rise_warmup:
            return
        if self.low is None or self.ema < self.low:
            self.low, self.low_step, self.above = self.ema, step, 0
        elif self.ema > self.low * (1 + self.cfg.loss_rise):
            self.above += 1
        else:
            self.above = 0

    def give_up(self, step: int) -> None:
        """No checkpoint to roll back to: clear the trigger's window (the spikes counted so far
        and the loss level, which becomes the new reference) and go on."""
        self.spiking.clear()
        if self.ema is not None and self.low is not None:
            self.low, self.low_step, self.above = self.ema, step, 0
        self.decision = None

    # -- after a rollback ------------------------------------------------------------------------

    def lr_scale(self, step: int) -> float:
        """The factor on the schedule's lr of optimizer step ``step`` (0-based)."""
        return self.lr_factor if step < self.lr_until else 1.0

    def add(self, record: dict[str, Any], restored_step: int) -> None:
        """Count a rollback to ``restored_step`` (after :meth:`load_state_dict` of its
        checkpoint) and lower the lr after it; a rollback while the lr is still lowered lowers it
        further. Sets ``lr_factor`` / ``lr_until_step`` in ``record``."""
        if self.cfg.lr_steps and self.cfg.lr_factor != 1:
            self.lr_factor = self.cfg.lr_factor * self.lr_scale(restored_step)
            self.lr_until = restored_step + self.cfg.lr_steps
        record["lr_factor"], record["lr_until_step"] = self.lr_scale(restored_step), self.lr_until
        self.history.append(record)

    # -- checkpoint state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able; taken after a drain (nothing pending)."""
        return {
            "history": self.history,
            "lr_factor": self.lr_factor,
            "lr_until": self.lr_until,
            "trigger": {
                "spiking": list(self.spiking), "ema": self.ema, "applied": self.applied,
                "low": self.low, "low_step": self.low_step, "above": self.above,
            },
        }  # fmt: skip

    def load_state_dict(
        self, state: dict[str, Any] | None, trainer_state: dict[str, Any], *, rollback: bool = False
    ) -> None:
        """Restore from a checkpoint's trainer state (``state`` is its ``rollback`` part; None
        for a checkpoint from before rollbacks). ``rollback``: keep this run's list of rollbacks
        (it holds the checkpoint's, and those done since)."""
        state = state or {}
        self._reset_trigger()
        self._pending, self.decision = [], None
        if "spikes" in trainer_state:  # the logged detector's windows: equal to ours
            self.detector.load_state_dict(trainer_state["spikes"])
        t = state.get("trigger") or {}
        self.spiking = deque(int(s) for s in t.get("spiking", []))
        self.ema, self.applied = t.get("ema"), int(t.get("applied", 0))
        self.low, self.low_step = t.get("low"), int(t.get("low_step", 0))
        self.above = int(t.get("above", 0))
        self.lr_factor = float(state.get("lr_factor", 1.0))
        self.lr_until = int(state.get("lr_until", 0))
        if not rollback:
            self.history = list(state.get("history", []))


def agree(decision: Decision | None) -> Decision | None:
    """The decision every rank takes: each rank's own, checked equal on all ranks with one host
    all-reduce (they compute it from the same global values; a difference is a bug, raised on
    every rank rather than left to hang in the next collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decision
    fired = decision is not None
    first = decision.first_step if decision is not None else 0
    t = torch.tensor([fired, -fired, first, -first], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=D.gloo_group("control"))
    if t[0] != -t[1] or t[2] != -t[3]:
        raise RuntimeError(
            "ranks disagree about a rollback (some fired, or at different steps): their loss "
            "or spike-guard values differ, which they never should"
        )
    return decision


def limit_message(decision: Decision, history: list[dict[str, Any]], cfg: RollbackConfig) -> str:
    done = ", ".join(f"{r['from_step']} -> {r['to_step']}" for r in history) or "none"
    return (
        f"spikes persist at step {decision.step}: {decision.describe()}, after "
        f"{len(history)} rollback(s) (train.rollback.max_rollbacks={cfg.max_rollbacks}; done: "
        f"{done}). Stopping; every checkpoint is kept. The rollback records in metrics.jsonl "
        "name the skipped samples and rolled_back.jsonl holds the abandoned steps. Resume "
        "(checkpoint.resume=auto) with a lower optim.lr, more data.skip_ranges or a higher "
        "train.rollback.max_rollbacks"
    )


# -- the logs ------------------------------------------------------------------------------------


def _records(path: Path) -> list[tuple[str, dict[str, Any] | None]]:
    """(line, record) of every line of a JSONL file (record None for a line cut by a crash)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            out.append((line, None))
    return out


def _rewrite(path: Path, lines: list[str], *, in_place: bool) -> None:
    """Replace ``path``'s content with ``lines``. ``in_place``: keep the file (a logger holds
    it open in append mode and goes on appending to it); else through a temporary file."""
    text = "".join(line + "\n" for line in lines)
    if in_place:
        with path.open("r+") as f:
            f.write(text)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    else:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def move_abandoned(run_dir: Path, to_step: int, number: int) -> int:
    """Rank 0, at rollback ``number`` to ``to_step``: move the records of later steps from
    metrics.jsonl (dropping them from spikes.jsonl, which holds copies) to rolled_back.jsonl,
    tagged ``rolled_back_by``. Returns how many were moved."""
    metrics, spikes = (run_dir / name for name in LOGS)
    kept, moved = [], []
    for line, rec in _records(metrics):
        if rec is not None and rec.get("step", 0) > to_step:
            moved.append(json.dumps({**rec, "rolled_back_by": number}))
        elif rec is not None:
            kept.append(line)
    with (run_dir / ROLLED_BACK).open("a") as f:  # first: a crash then loses nothing
        f.write("".join(line + "\n" for line in moved))
        f.flush()
        os.fsync(f.fileno())
    if metrics.exists():
        _rewrite(metrics, kept, in_place=True)
    if spikes.exists():
        lines = [ln for ln, r in _records(spikes) if r is not None and r.get("step", 0) <= to_step]
        _rewrite(spikes, lines, in_place=True)
    return len(moved)


def trim_logs(run_dir: Path, rollbacks: int, resumed: bool) -> None:
    """Rank 0 at start, before the loggers open their files: a fresh run starts without
    rolled_back.jsonl; a resumed one whose checkpoint knows ``rollbacks`` rollbacks drops the
    records of later ones (the resumed run repeats them), so the logs equal the uninterrupted
    run's (the loggers then cut the records of steps after the checkpoint)."""
    side = run_dir / ROLLED_BACK
    if not resumed:
        side.unlink(missing_ok=True)
        return
    for path in [run_dir / name for name in LOGS]:
        rows = _records(path)
        keep = [
            ln
            for ln, r in rows
            if r is None or not (r.get("type") == "rollback" and r.get("count", 0) > rollbacks)
        ]
        if len(keep) != len(rows):
            _rewrite(path, keep, in_place=False)
    rows = _records(side)
    keep = [ln for ln, r in rows if r is not None and r.get("rolled_back_by", 0) <= rollbacks]
    if len(keep) != len(rows):
        _rewrite(side, keep, in_place=False)
