"""What the optimizer steps leave behind, read on the host: ``StepMonitor``.

Each step's global loss, grad norm and finite flag go into a device buffer (``history.py``), its
spike-guard flags and z-scores into another. A drain (at logging steps, checkpoints and
validation) reads them and feeds the spike detector, counts and logs the skipped non-finite steps
(aborting after ``train.max_nonfinite_in_row`` in a row) and the steps the spike guard skipped
(``spike_skip`` records) or gave in to (``spike_guard_reset``), and adds the finite ones to the
logging window, from which the logging step's record is made. Everything here is identical on
every rank: the values are global.

At the drain that finds spikes, the worst spike steps have their batch scored again and their
samples of the highest loss decoded into the spike record (``spike_explain.py``; a collective,
like the rest of that branch). It needs the model: the trainer passes it to :meth:`log_window`
(which every drain-carrying loop step calls from the first step on), or to the constructor.

The monitor also holds the step's device-side defenses, the spike guard (``spike_guard.py``) and
the clipper (``clipping.py``): the trainer hands them to ``train_step``, and their state is
checkpointed with the rest of the monitor's (:meth:`StepMonitor.state_dict`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kha_train.config import Config
from kha_train.training.clipping import build_clipper, load_clip_state
from kha_train.training.device_memory import alloc_retry_warning
from kha_train.training.distributed import DistEnv
from kha_train.training.grad_parts import GradParts
from kha_train.training.history import StepHistory
from kha_train.training.kha_drift import kha_drift
from kha_train.training.loggers import RunLoggers
from kha_train.training.metrics import LossWindow, WindowTimer, moe_record, peak_flops, train_record
from kha_train.training.schedule import lr_at
from kha_train.training.spike_explain import Explanation, SpikeExplainer
from kha_train.training.spike_guard import RESET, build_guard, skipped_for_spike, spike_metrics
from kha_train.training.spikes import SpikeDetector
from kha_train.training.step import StepResult


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StepMonitor:
    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        total_steps: int,
        run_dir: Path,
        model: nn.Module | None = None,
    ) -> None:
        self.cfg, self.env, self.total_steps, self.run_dir = cfg, env, total_steps, run_dir
        sp = cfg.logging.spikes
        self.detector = SpikeDetector(sp.window, sp.z_threshold, sp.warmup)
        # Scores spike steps' batches again (spike_explain.py); needs the model (log_window).
        self.explainer = SpikeExplainer(cfg, env.rank, env.world_size)
        self.model = model
        # The step splits its grad norm by model part (grad_parts.py) for the spike records.
        self.grad_parts = GradParts(model) if model is not None else None
        self.skipped_total = 0  # non-finite steps skipped (host copy, updated at drains)
        self.in_row = 0  # consecutive non-finite steps at the last drain
        self.history = StepHistory(cfg.logging.log_every, env.device)
        # Per history row: the step's spike-guard flags and its z-scores of loss and grad norm.
        self._verdicts = torch.zeros(cfg.logging.log_every, 3, device=env.device)
        self.guard = build_guard(cfg.optim.skip_step, env.device)  # None: optim.skip_step off
        self.clipper = build_clipper(cfg.optim, env.device)
        self.spike_skipped_total = 0  # steps the guard skipped (host copy, updated at drains)
        self.spike_skipped_in_window = 0  # ... since the last logging step
        self.guard_resets = 0  # times the guard gave in after max_in_row skipped spikes
        self.window = LossWindow()  # host sums over the logging window (drains may split it)
        self.last_counts: torch.Tensor | None = None  # expert counts of the latest step
        self.flops_per_token = _model_flops(cfg)
        self.warned_alloc_retries = False  # the allocator-retry warning is given once a run
        self.retries_seen: int | None = None  # the allocator's retries at the last logged step
        self.peak_flops = peak_flops(env.device, cfg.logging.peak_tflops)

    def state_dict(self) -> dict[str, Any]:
        """The spike windows, non-finite and skip counters, the spike guard's and the clipper's
        state (JSON-able). Call after :meth:`drain`; reads the device state (a host sync)."""
        return {
            "spikes": self.detector.state_dict(),
            "nonfinite": {"skipped_total": self.skipped_total, "in_row": self.in_row},
            "spike_skip": {
                "skipped_total": self.spike_skipped_total,
                "resets": self.guard_resets,
                "guard": None if self.guard is None else self.guard.state_dict(),
            },
            "clip": self.clipper.state_dict(),
            "spike_explain": {"explained": self.explainer.explained},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A checkpoint from before the spike guard, or without it
        on, starts the guard fresh; a changed ``optim.clip_mode`` starts the new clipper fresh."""
        self.detector.load_state_dict(state["spikes"])
        self.skipped_total = int(state["nonfinite"]["skipped_total"])
        self.in_row = int(state["nonfinite"]["in_row"])
        self.history = StepHistory(self.cfg.logging.log_every, self.env.device, self.in_row)
        skip = state.get("spike_skip") or {}
        self.spike_skipped_total = int(skip.get("skipped_total", 0))
        self.guard_resets = int(skip.get("resets", 0))
        if self.guard is not None and skip.get("guard") is not None:
            self.guard.load_state_dict(skip["guard"])
        load_clip_state(self.clipper, state.get("clip"))
        self.explainer.explained = int((state.get("spike_explain") or {}).get("explained", 0))

    def record(self, step: int, result: StepResult, sample_ids: torch.Tensor, log: RunLoggers):
        """Keep optimizer step ``step`` (1-based) on the device; drains first when full."""
        if result.counts is not None:
            self.last_counts = result.counts
        # The loop drains at least every log_every steps; stepping by hand drains when full.
        if self.history.full:
            self.drain(step - 1, log)
        self._verdicts[len(self.history)] = torch.cat([result.flags.float().view(1), result.z])
        self.history.record(
            step, result.loss, result.grad_norm, result.finite, sample_ids, result.grad_parts
        )

    def drain(self, step: int, log: RunLoggers) -> None:
        """Read the steps since the last drain (up to ``step``): feed the spike detector, record
        skipped steps, and add to the logging window. A host sync; a collective if any step
        spiked or was skipped (every rank takes that branch together)."""
        n = len(self.history)
        if not n:
            return
        drained = self.history.drain()  # the host sync
        verdicts = self._verdicts[:n].tolist()
        parts = self._parts_by_step(drained.steps)
        spikes, bad, skips, resets = [], [], [], []
        for v, (flags, z_loss, z_gnorm) in zip(drained.steps, verdicts, strict=True):
            if v.ok:  # finite
                skipped, reset = skipped_for_spike(int(flags)), bool(int(flags) & RESET)
                spikes.extend(
                    self.detector.observe(
                        v.step, v.loss, v.grad_norm, accepted=not skipped, restart=reset
                    )
                )
                self.window.add(v.loss, v.grad_norm, parts.get(v.step, {}).get("grad_norm_parts"))
                if skipped:
                    skips.append((v, int(flags), z_loss, z_gnorm))
                if reset:
                    resets.append((v, int(flags), z_loss, z_gnorm))
            else:
                bad.append(v)
        if spikes or bad or skips or resets:  # every rank takes this branch together
            ids = self.history.gather_sample_ids(self.env.world_size, self.env.device)
            for s in spikes:
                s.sample_ids = ids[s.step]
            spike_records = [{**s.to_dict(), **parts.get(s.step, {})} for s in spikes]
            explained = self._explain(step, spike_records, skips + resets, ids)
            log.log_spikes(step, spike_records, self.detector.num_spikes)
            for v in bad:
                log.event(
                    {"type": "nonfinite", "step": v.step, "loss": v.loss,
                     "grad_norm": v.grad_norm, "sample_ids": ids[v.step],
                     **parts.get(v.step, {})},
                    echo=f"step {v.step}: non-finite loss {v.loss} / grad norm {v.grad_norm}: "
                    "update skipped (weights and optimizer state unchanged)",
                )  # fmt: skip
            self._log_guard(log, ids, skips, resets, explained, parts)
            self._echo_explained(log, explained)
        self.skipped_total += len(bad)
        self.spike_skipped_total += len(skips)
        self.spike_skipped_in_window += len(skips)
        self.guard_resets += len(resets)
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

    def log_window(
        self,
        step: int,
        timer: WindowTimer,
        log: RunLoggers,
        model: nn.Module,
        lr_scale: float = 1.0,
    ) -> None:
        """Drain, then log the window's record (loss, grad norm, lr, throughput, MoE load...)."""
        self.model = model  # for the drains that explain spikes (also those of checkpoints)
        self.drain(step, log)
        elapsed, data_wait, steps = timer.read_and_reset()
        cfg = self.cfg
        rec = train_record(
            step=step, total_steps=self.total_steps, tokens_per_step=cfg.train.global_batch_tokens,
            lr=lr_scale * lr_at(max(0, step - 1), peak_lr=cfg.optim.lr,
                                total_steps=self.total_steps, cfg=cfg.schedule),
            window=self.window, elapsed_s=elapsed, data_wait_s=data_wait, timed_steps=steps,
            world_size=self.env.world_size, flops_per_token=self.flops_per_token,
            peak_flops_per_device=self.peak_flops, device=self.env.device,
        )  # fmt: skip
        rec["nonfinite_skipped"] = self.skipped_total
        rec["nonfinite_in_window"] = self.window.skipped
        rec["spikes_total"] = self.detector.num_spikes
        if self.guard is not None:
            rec["spike_skipped"] = self.spike_skipped_total
            rec["spike_skipped_in_window"] = self.spike_skipped_in_window
        self.spike_skipped_in_window = 0
        if self.last_counts is not None:
            rec.update(moe_record(self.last_counts))
        aux = getattr(model, "last_aux_loss", None)
        if aux is not None:
            rec["aux_loss"] = float(aux)
        drift = kha_drift(model)  # a collective under FSDP2: every rank logs windows
        if drift:
            rec["kha_drift"] = drift
        self.window = LossWindow()
        first_window = self.retries_seen is None
        if "alloc_retries" in rec:  # the allocator's count since the start -> this window's
            seen, self.retries_seen = self.retries_seen or 0, rec["alloc_retries"]
            rec["alloc_retries"] -= seen
        log.log(rec)
        # Warned once, and not for the first window (compilation and first allocations).
        if rec.get("alloc_retries") and not first_window and not self.warned_alloc_retries:
            self.warned_alloc_retries = True
            log.info(alloc_retry_warning(rec["alloc_retries"], cfg, self.env.world_size))

    def _parts_by_step(self, steps: list[Any]) -> dict[int, dict[str, Any]]:
        """step -> ``{"grad_norm_parts": {part: norm}}``: for the logging window and the
        records of steps that spiked, were skipped or were not finite (no entry for a step that
        did not split its norm)."""
        if self.grad_parts is None:
            return {}
        names = self.grad_parts.names
        return {v.step: {"grad_norm_parts": dict(zip(names, v.grad_parts, strict=True))}
                for v in steps if v.grad_parts is not None}  # fmt: skip

    def _explain(
        self,
        step: int,
        spike_records: list[dict[str, Any]],
        guarded: list[tuple[Any, int, float, float]],
        ids: dict[int, list[int]],
    ) -> dict[int, Explanation]:
        """Score the batches of the worst spike steps of this drain again (``spike_explain.py``;
        a collective) and put each one's top samples into its spike record of the highest z
        (:meth:`_log_guard` gives them to the guard's record of a step the detector did not
        flag: ``Explanation.recorded`` false). Returns step -> its explanation."""
        if self.model is None or not self.explainer.enabled:
            return {}
        z: dict[int, float] = {}
        for r in spike_records:
            z[r["step"]] = max(z.get(r["step"], -math.inf), r["z"])
        for v, _, z_loss, z_gnorm in guarded:
            z[v.step] = max(z.get(v.step, -math.inf), z_loss, z_gnorm)
        steps = self.explainer.choose(z)
        found = self.explainer.explain(self.model, steps, ids, step)
        for s, e in found.items():
            mine = [r for r in spike_records if r["step"] == s]
            if mine:
                max(mine, key=lambda r: r["z"]).update(e.record_fields())
                e.recorded = True
        return found

    def _echo_explained(self, log: RunLoggers, explained: dict[int, Explanation]) -> None:
        """One console line per explained spike step: its worst sample."""
        for s, e in sorted(explained.items()):
            if not e.samples:
                continue
            top = e.samples[0]
            text = top.get("text")
            snippet = " ".join(text.split())[:80] if text else "(no text: see metrics.jsonl)"
            log.info(
                f"step {s}: sample {top['id']} has the highest loss of its batch, "
                f"{top['loss']:.4g} (batch mean {e.batch_loss:.4g}, scored at step "
                f"{e.scored_at_step}): {snippet!r}; all: `kha-train spikes {self.run_dir}`"
            )

    def _log_guard(
        self,
        log: RunLoggers,
        ids: dict[int, list[int]],
        skips: list[tuple[Any, int, float, float]],
        resets: list[tuple[Any, int, float, float]],
        explained: dict[int, Explanation] | None = None,
        parts: dict[int, dict[str, Any]] | None = None,
    ) -> None:
        """``spike_skip`` and ``spike_guard_reset`` records (metrics.jsonl and the console).
        A step in ``explained`` that the detector did not flag gets its top samples here."""
        explained, parts = explained or {}, parts or {}
        g = self.cfg.optim.skip_step
        for kind, entries in (("spike_skip", skips), ("spike_guard_reset", resets)):
            for v, flags, z_loss, z_gnorm in entries:
                rec = {
                    "type": kind, "step": v.step, "metrics": spike_metrics(flags),
                    "loss": v.loss, "grad_norm": v.grad_norm, "loss_z": z_loss,
                    "grad_norm_z": z_gnorm, "sample_ids": ids[v.step], **parts.get(v.step, {}),
                }  # fmt: skip
                what = " and ".join(
                    f"{m.replace('_', ' ')} {rec[m]:.4g} (z={rec[m + '_z']:.1f})"
                    for m in rec["metrics"]
                )
                if kind == "spike_skip":
                    echo = (
                        f"step {v.step}: {what} above {g.z_threshold:g} std of the last applied "
                        "steps: update skipped (weights, optimizer state and expert biases "
                        "unchanged)"
                    )
                else:
                    rec["skipped_in_row"] = g.max_in_row
                    echo = (
                        f"step {v.step}: {what} is a spike, but {g.max_in_row} were skipped in "
                        "a row before it: applied, and the spike guard restarts its statistics "
                        f"(no skipping for {g.min_history} steps)"
                    )
                e = explained.get(v.step)
                if e is not None and not e.recorded:
                    rec.update(e.record_fields())
                    e.recorded = True
                log.event(rec, echo=echo)


def _model_flops(cfg: Config) -> float | None:
    """Training FLOPs per token of the model (None if they cannot be counted)."""
    try:
        from kha_train.model.flops import train_flops_per_token

        return train_flops_per_token(cfg.model, cfg.data.seq_len)
    except Exception:  # accounting must never stop training
        return None
