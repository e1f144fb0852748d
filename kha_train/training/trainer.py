"""The training loop.

``Trainer(cfg)`` builds everything in this order (each step needs the ones before it):

    validate the config for the real number of ranks -> process group + device -> data loaders
    (the dataset's tokenizer and vocab are checked against the config before any model exists)
    -> model on the meta device -> parallelize (AC, compile, FSDP2) -> allocate -> init_weights
    (seeded, identical for any number of ranks) -> AdamW -> checkpoint manager -> resume ->
    loggers (the pieces: ``build.py``).

``Trainer.train()`` runs optimizer steps until ``train.max_steps`` / ``train.total_tokens``, a
preemption signal, too many non-finite steps in a row, or too many rollbacks. Each is
``step.train_step`` (the same function the benchmark times) at the schedule's learning rate; its
results stay on the device until the monitor (``monitor.py``) reads them at a logging step,
checkpoint or validation. With ``train.rollback`` on, persistent spikes found at those reads
roll the run back to an earlier checkpoint in this process (``rollback.py``, ``_roll_back``).
Validation (the loss of the val split): ``validation.py``; evaluation (loss and bits per byte of
the ``eval.sets`` texts): ``evaluator.py``.

No host-device sync in the hot loop; the only per-step cross-rank exchange is a one-int gloo
all-reduce of the preemption flag (host memory: it does not wait for the GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from kha_train.config import Config, ConfigError
from kha_train.config_checks import total_steps, validate
from kha_train.fs import StorageError, storage_error
from kha_train.training import distributed as D
from kha_train.training.build import build_loaders, build_model, config_snapshot, resume_path
from kha_train.training.checkpoint import CheckpointManager, complete_checkpoints, latest_checkpoint
from kha_train.training.checkpoint_checks import STEP_DIR
from kha_train.training.determinism import make_deterministic
from kha_train.training.device_memory import OutOfDeviceMemoryError, out_of_memory_message
from kha_train.training.evaluator import build_evaluator
from kha_train.training.hf_export import HFExporter
from kha_train.training.loggers import RunLoggers, read_jsonl
from kha_train.training.metrics import WindowTimer
from kha_train.training.monitor import NonFiniteError, StepMonitor
from kha_train.training.optim import build_optimizer, is_fused
from kha_train.training.parallel import compiles
from kha_train.training.rollback import (
    Decision,
    RollbackLimitError,
    Rollbacks,
    agree,
    limit_message,
    move_abandoned,
    trim_logs,
)
from kha_train.training.runlock import RunLock, RunLockedError
from kha_train.training.schedule import lr_at
from kha_train.training.start_lines import start_lines, storage_warnings
from kha_train.training.step import StepResult, train_step
from kha_train.training.validation import validation_loss

STATE_VERSION = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Trainer:
    def __init__(self, cfg: Config, *, console: TextIO | None = None) -> None:
        validate(cfg, D.env_world_size())
        if cfg.train.deterministic:
            make_deterministic()  # before any CUDA work
        self.cfg = cfg
        self.env = D.init_distributed(cfg.train.device)
        self.device = self.env.device
        self.total_steps = total_steps(cfg)
        self.tokens_per_step = cfg.train.global_batch_tokens
        # A Config built in Python (not loaded through OmegaConf) keeps the literal default.
        self.run_dir = Path(cfg.logging.run_dir.replace("${name}", cfg.name))
        self.ckpt_dir = (
            Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        )
        self.config_yaml, self.config_dict = config_snapshot(cfg)
        # One trainer per run directory, taken before anything in it is touched.
        self.lock = self._lock_run_dir()
        try:
            self._build(console)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 locks the run directory (``runlock.py``); every rank fails if it cannot."""
        lock, error = None, None
        if self.env.is_main:
            try:
                lock = RunLock(self.run_dir)
            except (RunLockedError, StorageError) as e:
                error = e
        if D.any_rank(error is not None):
            raise error or RunLockedError(f"rank 0 could not lock {self.run_dir}: see its error")
        return lock

    def _build(self, console: TextIO | None) -> None:
        cfg = self.cfg
        resume_path(cfg.checkpoint.resume, self.ckpt_dir)  # refuses a fresh run over old ones
        loaders = build_loaders(cfg, self.env)
        self.loader, self.val_loader = loaders.train, loaders.val
        self.val_batches = loaders.val_batches
        # The eval texts are read now: a bad path or tokenizer fails before the model exists.
        self.evaluator = build_evaluator(cfg, self.loader.index, self.env.rank, self.env.world_size)
        self._eval_clock = time.perf_counter()  # when the last evaluation ended
        self.model = build_model(
            cfg.model, cfg.parallel, cfg.train.precision, self.device, seed=cfg.train.seed,
            compile_loss=cfg.parallel.compile_loss,
        )  # fmt: skip
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.fused = is_fused(self.optimizer)
        self.ckpt = CheckpointManager(
            self.ckpt_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, self.env
        )
        self.monitor = self._new_monitor()
        self.rollbacks = Rollbacks(cfg.train.rollback, cfg.logging.spikes)
        self.exporter = (
            HFExporter(self.run_dir, cfg.checkpoint.keep_last, self._export_report)
            if cfg.checkpoint.export_hf and self.env.is_main
            else None
        )
        self.step = 0  # optimizer steps done
        restored = self.ckpt.restore(
            cfg.checkpoint.resume, self.model, self.optimizer, self.config_dict["model"]
        )
        resume = None if restored is None else restored.path
        if restored is not None:
            self._load(restored.path, restored.state)
        self._last_saved = self.step if self.step > 0 else -1  # step of the newest checkpoint
        self._stop_signal: str | None = None  # set by the signal handler during train()
        self._refresh_snapshot()  # data.skip_ranges as the loader resolved them
        if self.env.is_main:
            try:
                (self.run_dir / "config.yaml").write_text(self.config_yaml)
                trim_logs(self.run_dir, len(self.rollbacks.history), resumed=resume is not None)
            except OSError as e:
                raise storage_error(e, "write the run config", self.run_dir) from e
        self.log = RunLoggers(
            run_dir=self.run_dir, name=cfg.name, wandb_mode=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, wandb_entity=cfg.logging.wandb_entity,
            tensorboard=cfg.logging.tensorboard, config=self.config_dict,
            total_steps=self.total_steps, start_step=self.step,
            resumed=resume is not None, is_main=self.env.is_main, console_stream=console,
        )  # fmt: skip
        notes = [f"warning: {n}" for n in ([] if restored is None else restored.notes)]
        notes += [f"note: {n}" for n in self.loader.notes]
        for line in start_lines(self, resume) + notes:
            self.log.info(line)
        for line in storage_warnings(self):  # after the rest: it reads the checkpoint folder
            self.log.info(line)

    def _new_monitor(self) -> StepMonitor:
        """A fresh monitor (at start, and at a rollback before loading the checkpoint's state)."""
        return StepMonitor(self.cfg, self.env, self.total_steps, self.run_dir, model=self.model)

    def _refresh_snapshot(self) -> None:
        """The config saved with the run and its checkpoints, with ``data.skip_ranges`` as every
        range the loader skips (resolved to samples: ranges, those of rollbacks included), so a
        run started from it reads the same data."""
        specs = self.loader.skipped_specs()
        if specs != list(self.cfg.data.skip_ranges):
            data = dataclasses.replace(self.cfg.data, skip_ranges=specs)
            self.config_yaml, self.config_dict = config_snapshot(
                dataclasses.replace(self.cfg, data=data)
            )

    # -- checkpoint state -------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """Everything besides model and optimizer that a resume needs (JSON-able, same on every
        rank). Call after ``_drain()``."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "tokens_seen": self.step * self.tokens_per_step,
            "loader": self.loader.state_dict(),  # the position and every skipped range
            **self.monitor.state_dict(),  # spikes, nonfinite
            "rollback": self.rollbacks.state_dict(),
            "world_size": self.env.world_size,
        }

    def _load(self, path: Path, state: dict[str, Any], *, rollback: bool = False) -> None:
        """Continue from the trainer state saved with checkpoint ``path`` (model and optimizer
        are already loaded). ``rollback``: keep the live run's skipped ranges and list of
        rollbacks (they hold the checkpoint's, and those added since)."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"{path}: trainer state version {state.get('version')}, expected {STATE_VERSION}"
            )
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"], keep_skips=rollback)
        self.monitor.load_state_dict(state)
        self.rollbacks.load_state_dict(state.get("rollback"), state, rollback=rollback)

    def save_checkpoint(self, *, blocking: bool = False) -> Path:
        self._drain()
        if self.exporter is not None:  # its checkpoint may be rotated away by this save
            self.exporter.wait()
        self.log.activity(f"saving checkpoint step {self.step}")
        path = self.ckpt.save(
            self.step, self.model, self.optimizer, self.trainer_state(), self.config_yaml,
            blocking=blocking,
        )  # fmt: skip
        self.log.activity("training")
        self._last_saved = self.step
        self.log.event({"type": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def _export_published(self, wait: bool = False) -> None:
        """``checkpoint.export_hf``: start the export of newly completed checkpoints, report
        finished ones (``hf_export.py``); ``wait``: until the last one is written."""
        if self.exporter is None:
            return
        for path in self.ckpt.take_published():
            m = STEP_DIR.match(path.name)
            self.exporter.start(int(m.group(1)) if m else self.step, path)
        if wait:
            self.log.activity("exporting to Hugging Face format")
            self.exporter.wait()
        else:
            self.exporter.poll()

    def _export_report(self, line: str, record: dict[str, Any]) -> None:
        self.log.event(record, echo=line)

    # -- one optimizer step -----------------------------------------------------------------------

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of one micro-batch (a method so tests can inject faults)."""
        return self.model(batch.input_ids, batch.labels)

    def _step(self, micro_batches: list[Any]) -> StepResult:
        """One optimizer step (``step.train_step``), recorded in the history. A step the spike
        guard skips still counts: the schedule, tokens seen and the data position move on."""
        lr = lr_at(
            self.step, peak_lr=self.cfg.optim.lr, total_steps=self.total_steps,
            cfg=self.cfg.schedule,
        ) * self.rollbacks.lr_scale(self.step)  # fmt: skip
        result = train_step(
            self.model, self.optimizer, micro_batches, parallel=self.cfg.parallel,
            grad_clip=self.cfg.optim.grad_clip, lr=lr, compute_loss=self.compute_loss,
            guard=self.monitor.guard, clipper=self.monitor.clipper, parts=self.monitor.grad_parts,
        )  # fmt: skip
        ids = torch.cat([b.sample_ids for b in micro_batches])
        self.monitor.record(self.step + 1, result, ids, self.log)
        self.rollbacks.record(self.step + 1, result)
        self.step += 1
        return result

    def _drain(self) -> None:
        """Read the device history into the monitor (a host sync; see ``monitor.py``), and the
        rollback trigger's values (a decision it takes waits for :meth:`_check_rollback`)."""
        self.monitor.drain(self.step, self.log)
        self.rollbacks.observe()

    # -- rollback ---------------------------------------------------------------------------------

    def _check_rollback(self) -> bool:
        """``train.rollback``, at a drain point of the loop (logging steps, checkpoints, the
        end): drain, and roll back if the trigger fired (every rank together). True if it did."""
        self._drain()
        decision = agree(self.rollbacks.take_decision())
        return decision is not None and self._roll_back(decision)

    def _roll_back(self, d: Decision) -> bool:
        """Restore the newest checkpoint before the spike window, skip the window's batches
        (plus ``skip_margin``), go on from the checkpoint's step (``rollback.py``). False (and
        the trigger cleared) if there is no checkpoint before the window."""
        cfg = self.cfg.train.rollback
        s, f, number = self.step, d.first_step, len(self.rollbacks.history) + 1
        if number > cfg.max_rollbacks:
            raise RollbackLimitError(limit_message(d, self.rollbacks.history, cfg))
        self.log.activity(f"rolling back: {d.describe()}")
        if self.exporter is not None:  # it may be reading a checkpoint about to be deleted
            self.exporter.wait()
        restored = self.ckpt.restore_before(
            f, self.model, self.optimizer, self.config_dict["model"]
        )
        if restored is None:
            self.rollbacks.give_up(s)
            kept = [p.name for _, p in complete_checkpoints(self.ckpt.directory)]
            self.log.event(
                {"type": "rollback_unavailable", "step": s, "reason": d.reason,
                 "first_step": f, "checkpoints": kept, **d.detail},
                echo=f"step {s}: {d.describe()}, but no checkpoint before step {f} to roll back "
                f"to (checkpoints: {', '.join(kept) or 'none'}): training goes on",
            )  # fmt: skip
            self.log.activity("training")
            return False
        old_monitor = self.monitor
        self.monitor = self._new_monitor()
        for attr in ("model",):  # what the trainer handed the monitor since it was built
            if hasattr(old_monitor, attr):
                setattr(self.monitor, attr, getattr(old_monitor, attr))
        self._load(restored.path, restored.state, rollback=True)
        c, last = self.step, s + cfg.skip_margin
        start, end = self.loader.skip_steps(f, last, source="rollback", rollback=number)
        discarded = self.ckpt.discard_after(c)
        self._last_saved = c
        record = {
            "type": "rollback", "step": c, "count": number, "from_step": s, "to_step": c,
            "reason": d.reason, "window": [f, s], "skipped_steps": [f, last],
            "skipped_samples": [start, end],
            "skipped_count": (last - f + 1) * self.loader.global_batch_size,
            "checkpoint": restored.path.name, "discarded": [p.name for p in discarded],
            # what the abandoned steps flagged and skipped: the counters restored with the
            # checkpoint no longer hold it, the end record adds it back
            "spikes_abandoned": old_monitor.detector.num_spikes - self.monitor.detector.num_spikes,
            "skips_abandoned": old_monitor.spike_skipped_total - self.monitor.spike_skipped_total,
            **d.detail,
        }  # fmt: skip
        self.rollbacks.add(record, c)
        self._refresh_snapshot()
        moved, error = 0, None
        if self.env.is_main:  # the abandoned steps' records to rolled_back.jsonl
            try:
                moved = move_abandoned(self.run_dir, c, number)
                (self.run_dir / "config.yaml").write_text(self.config_yaml)
            except OSError as e:
                error = storage_error(e, "rewrite the logs after a rollback", self.run_dir)
        if D.any_rank(error is not None):  # every rank stops, none waits in a collective
            raise error or StorageError("rank 0 could not rewrite the logs after a rollback")
        lr = (
            f"; lr x{record['lr_factor']:g} until step {record['lr_until_step']}"
            if record["lr_factor"] != 1
            else ""
        )
        self.log.event(
            {**record, "records_moved": moved},
            echo=f"step {s}: {d.describe()}: rolled back to {restored.path.name} (rollback "
            f"{number} of at most {cfg.max_rollbacks}); the batches of steps {f}-{last} (global "
            f"samples {start}-{end - 1}) are skipped{lr}",
        )
        for note in restored.notes:
            self.log.info(f"warning: {note}")
        self.log.advance(c)
        self.log.activity("training")
        return True

    # -- validation -------------------------------------------------------------------------------

    def validate(self) -> float | None:
        """Mean loss over ``train.val_batches`` micro-batches per rank of the val split."""
        if self.val_loader is None:
            return None
        self.log.activity(f"validating at step {self.step}")
        val = validation_loss(self.model, self.val_loader, self.val_batches)
        self.log.activity("training")
        self.log.log({"type": "val", "step": self.step, "val_loss": val})
        return val

    def evaluate(self) -> dict[str, Any] | None:
        """Loss and bits per byte of every ``eval.sets`` text (``evaluator.py``), logged with the
        time it took and its share of the wall time since the previous evaluation."""
        if self.evaluator is None:
            return None
        self.log.activity(f"evaluating at step {self.step}")
        figures = self.evaluator.evaluate(self.model)
        now = time.perf_counter()
        figures["share"] = figures["seconds"] / max(now - self._eval_clock, 1e-9)
        self._eval_clock = now
        self.log.activity("training")
        self.log.log({"type": "eval", "step": self.step, **figures})
        return figures

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> int:
        """Run to the end (or a stop signal). Returns the exit code (0)."""
        cfg = self.cfg
        if self.step >= self.total_steps:
            self.log.info(
                f"nothing to do: the run is already at step {self.step} of {self.total_steps} "
                "(raise train.max_steps or train.total_tokens to train on)"
            )
            if self._logged_end_status() == "completed":
                self.log.close({"status": "completed", "step": self.step})
            else:  # killed before its end record, or stopped after its last step by an older
                self._finish("completed")  # kha-train: its log says so now
            return 0
        self._stop_signal = None
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self._last_saved = self.step if self.step > 0 else -1
        self._eval_clock = time.perf_counter()
        stopped = False
        first_step = self.step + 1  # logged at once: the first line comes after one step
        try:
            timer = WindowTimer()
            self.log.activity(
                f"step {first_step}"
                + (" (compiling)" if compiles(cfg.parallel, self.device) else "")
            )
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                micro_batches = self.loader.next_step()
                timer.add_data_wait(time.perf_counter() - t0)
                self._step(micro_batches)
                timer.step()
                self.log.advance(self.step)
                if self.step == first_step:
                    self.log.activity("training")
                log_now = self.step % cfg.logging.log_every == 0 or self.step == first_step
                if log_now or self.step == self.total_steps:
                    self._log_window(timer)
                save_now = (
                    cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
                )
                drained = log_now or save_now or self.step == self.total_steps
                if self.rollbacks.enabled and drained and self._check_rollback():
                    timer.read_and_reset()  # back at an earlier step, on every rank
                    continue
                if cfg.train.val_every and self.step % cfg.train.val_every == 0:
                    self.validate()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if save_now:
                    self.save_checkpoint()
                self.ckpt.poll()
                self._export_published()
                if D.any_rank(self._stop_signal is not None):
                    stopped = True
                    break
            if stopped:
                if len(self.monitor.history):
                    self._log_window(timer)
                self.log.info(
                    f"stop requested ({self._stop_signal or 'signal on another rank'}) at step "
                    f"{self.step}: saving a checkpoint and exiting"
                )
            else:  # the final validation and evaluation, unless this step just had them
                if cfg.train.val_every == 0 or self.step % cfg.train.val_every:
                    self.validate()
                if cfg.eval.every == 0 or self.step % cfg.eval.every:
                    self.evaluate()
            if self._last_saved != self.step:
                self.save_checkpoint(blocking=True)
            self.ckpt.wait()
            self._export_published(wait=True)
            # A stop that comes after the last step stops nothing: every step is trained.
            self._finish("completed" if self.step >= self.total_steps else "preempted")
            return 0
        except NonFiniteError:
            self._finish("nonfinite", exit_code=1)
            raise
        except RollbackLimitError:
            self._finish("rollback_limit", exit_code=1)
            raise
        except torch.OutOfMemoryError as e:
            # The state may be half-way through a step: end the run without saving it, and say
            # what to change (training/device_memory.py).
            message = out_of_memory_message(
                e, cfg, self.env.world_size, self.step, self.device, self._saved_checkpoint()
            )
            self._finish("out_of_memory", exit_code=1, error=message)  # the CLI prints it
            raise OutOfDeviceMemoryError(message) from e
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _saved_checkpoint(self) -> Path | None:
        """The newest published checkpoint after a failure, an async save in flight finished
        first (it copied a consistent state before the failure); None when there is none or the
        folder cannot be read (the failure, not this, is what gets reported)."""
        # A failed async save: close() reports it; an older checkpoint may still be there.
        with contextlib.suppress(Exception):
            self.ckpt.wait()
        try:
            return latest_checkpoint(self.ckpt_dir)
        except Exception:
            return None

    def _logged_end_status(self) -> str | None:
        """The status of the last end record in the run's metrics log (None: none there)."""
        path = self.run_dir / "metrics.jsonl"
        ends = [r for r in read_jsonl(path) if r.get("type") == "end"] if path.is_file() else []
        return ends[-1].get("status") if ends else None

    def run_steps(self, until: int) -> None:
        """Train up to optimizer step ``until`` and drain the monitor: no validation, evaluation,
        checkpoint or end record (``kha-train replay`` re-runs a stretch of a run with it)."""
        timer = WindowTimer()
        while self.step < min(until, self.total_steps):
            self._step(self.loader.next_step())
            timer.step()
            if self.step % self.cfg.logging.log_every == 0:
                self._log_window(timer)
        self._drain()

    def _log_window(self, timer: WindowTimer) -> None:
        """The logging window's record up to this step, at the LR the step ran with."""
        self.monitor.log_window(
            self.step, timer, self.log, self.model, self.rollbacks.lr_scale(self.step - 1)
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name

    def _finish(self, status: str, exit_code: int = 0, error: str | None = None) -> None:
        summary = {
            "status": status, "step": self.step, "tokens_seen": self.step * self.tokens_per_step,
            "nonfinite_skipped": self.monitor.skipped_total,
            "spike_skipped": self.monitor.spike_skipped_total,
            "spikes_total": self.monitor.detector.num_spikes,
            "rollbacks": len(self.rollbacks.history),
            # flagged or skipped in steps that a rollback abandoned (not in the counts above)
            "spikes_rolled_back": sum(r.get("spikes_abandoned", 0) for r in self.rollbacks.history),
            "spike_skipped_rolled_back": sum(
                r.get("skips_abandoned", 0) for r in self.rollbacks.history
            ),
        }  # fmt: skip
        if error is not None:
            summary["error"] = error
        self.log.event({"type": "end", **summary})
        if self.env.is_main:
            try:
                from kha_train.training.plot import plot_loss

                png = plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
                if png:
                    self.log.info(f"{status} at step {self.step}; loss plot: {png}")
            except Exception as e:  # a plot must never fail a finished run
                self.log.info(f"warning: could not draw loss.png: {e}")
        self.log.close(summary, exit_code)

    def close(self) -> None:
        """Finish an in-flight async save (also after an error), stop the loaders' and the
        console's threads, and free the run directory."""
        try:
            self.ckpt.wait()
        except Exception as e:  # the run's own error, if any, is the one to report
            self.log.info(f"warning: the last async checkpoint did not complete: {e}")
        self.log.stop_heartbeat()
        self.loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
        if self.lock is not None:
            self.lock.release()
