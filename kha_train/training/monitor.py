"""What the optimizer steps leave behind, read on the host: ``StepMonitor``.

Each step's global loss, grad norm and ok flag go into a device buffer (``history.py``). A drain
(at logging steps, checkpoints and validation) reads them in one transfer and feeds the spike
detector, counts and logs the skipped non-finite steps (aborting after
``train.max_nonfinite_in_row`` in a row), and adds the finite ones to the logging window, from
which the logging step's record is made. Everything here is identical on every rank: the values
are global.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kha_train.config import Config
from kha_train.training.distributed import DistEnv
from kha_train.training.history import StepHistory
from kha_train.training.loggers import RunLoggers
from kha_train.training.metrics import LossWindow, WindowTimer, moe_record, peak_flops, train_record
from kha_train.training.schedule import lr_at
from kha_train.training.spikes import SpikeDetector
from kha_train.training.step import StepResult


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StepMonitor:
    def __init__(self, cfg: Config, env: DistEnv, total_steps: int, run_dir: Path) -> None:
        self.cfg, self.env, self.total_steps, self.run_dir = cfg, env, total_steps, run_dir
        sp = cfg.logging.spikes
        self.detector = SpikeDetector(sp.window, sp.z_threshold, sp.warmup)
        self.skipped_total = 0  # non-finite steps skipped (host copy, updated at drains)
        self.in_row = 0  # consecutive non-finite steps at the last drain
        self.history = StepHistory(cfg.logging.log_every, env.device)
        self.window = LossWindow()  # host sums over the logging window (drains may split it)
        self.last_counts: torch.Tensor | None = None  # expert counts of the latest step
        self.flops_per_token = _model_flops(cfg)
        self.peak_flops = peak_flops(env.device, cfg.logging.peak_tflops)

    def state_dict(self) -> dict[str, Any]:
        """The spike windows and non-finite counters (JSON-able). Call after :meth:`drain`."""
        return {
            "spikes": self.detector.state_dict(),
            "nonfinite": {"skipped_total": self.skipped_total, "in_row": self.in_row},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["spikes"])
        self.skipped_total = int(state["nonfinite"]["skipped_total"])
        self.in_row = int(state["nonfinite"]["in_row"])
        self.history = StepHistory(self.cfg.logging.log_every, self.env.device, self.in_row)

    def record(self, step: int, result: StepResult, sample_ids: torch.Tensor, log: RunLoggers):
        """Keep optimizer step ``step`` (1-based) on the device; drains first when full."""
        if result.counts is not None:
            self.last_counts = result.counts
        # The loop drains at least every log_every steps; stepping by hand drains when full.
        if self.history.full:
            self.drain(step - 1, log)
        self.history.record(step, result.loss, result.grad_norm, result.ok, sample_ids)

    def drain(self, step: int, log: RunLoggers) -> None:
        """Read the steps since the last drain (up to ``step``): feed the spike detector, record
        skipped steps, and add to the logging window. A host sync; a collective if any step
        spiked or was skipped (every rank takes that branch together)."""
        if not len(self.history):
            return
        drained = self.history.drain()  # the host sync
        spikes, bad = [], []
        for v in drained.steps:
            if v.ok:
                spikes.extend(self.detector.observe(v.step, v.loss, v.grad_norm))
                self.window.add(v.loss, v.grad_norm)
            else:
                bad.append(v)
        if spikes or bad:  # every rank takes this branch together: the values are global
            ids = self.history.gather_sample_ids(self.env.world_size, self.env.device)
            for s in spikes:
                s.sample_ids = ids[s.step]
            log.log_spikes(step, [s.to_dict() for s in spikes], self.detector.num_spikes)
            for v in bad:
                log.event(
                    {"type": "nonfinite", "step": v.step, "loss": v.loss,
                     "grad_norm": v.grad_norm, "sample_ids": ids[v.step]},
                    echo=f"step {v.step}: non-finite loss {v.loss} / grad norm {v.grad_norm}: "
                    "update skipped (weights and optimizer state unchanged)",
                )  # fmt: skip
        self.skipped_total += len(bad)
        self.window.skipped += len(bad)
        self.in_row = drained.in_row
        limit = self.cfg.train.max_nonfinite_in_row
        if drained.max_in_row >= limit:
            raise NonFiniteError(
                f"{drained.max_in_row} consecutive optimizer steps (up to step {step}) had a "
                f"non-finite loss or gradient norm, train.max_nonfinite_in_row={limit}: stopping. "
                "None of them was applied to the weights. Their sample ids are in "
                f"{self.run_dir / 'metrics.jsonl'} (type nonfinite). Lower optim.lr, check the "
                "data at those ids, or resume from the last checkpoint with checkpoint.resume=auto"
            )

    def log_window(self, step: int, timer: WindowTimer, log: RunLoggers, model: nn.Module) -> None:
        """Drain, then log the window's record (loss, grad norm, lr, throughput, MoE load...)."""
        self.drain(step, log)
        elapsed, data_wait, steps = timer.read_and_reset()
        cfg = self.cfg
        rec = train_record(
            step=step, total_steps=self.total_steps, tokens_per_step=cfg.train.global_batch_tokens,
            lr=lr_at(max(0, step - 1), peak_lr=cfg.optim.lr, total_steps=self.total_steps,
                     cfg=cfg.schedule),
            window=self.window, elapsed_s=elapsed, data_wait_s=data_wait, timed_steps=steps,
            world_size=self.env.world_size, flops_per_token=self.flops_per_token,
            peak_flops_per_device=self.peak_flops, device=self.env.device,
        )  # fmt: skip
        rec["nonfinite_skipped"] = self.skipped_total
        rec["nonfinite_in_window"] = self.window.skipped
        rec["spikes_total"] = self.detector.num_spikes
        if self.last_counts is not None:
            rec.update(moe_record(self.last_counts))
        aux = getattr(model, "last_aux_loss", None)
        if aux is not None:
            rec["aux_loss"] = float(aux)
        self.window = LossWindow()
        log.log(rec)


def _model_flops(cfg: Config) -> float | None:
    """Training FLOPs per token of the model (None if they cannot be counted)."""
    try:
        from kha_train.model.flops import train_flops_per_token

        return train_flops_per_token(cfg.model, cfg.data.seq_len)
    except Exception:  # accounting must never stop training
        return None
