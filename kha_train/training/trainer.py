"""The training loop.

``Trainer(cfg)`` builds everything in this order (each step needs the ones before it):

    validate the config for the real number of ranks -> process group + device -> data loaders
    (the dataset's tokenizer and vocab are checked against the config before any model exists)
    -> model on the meta device -> parallelize (AC, compile, FSDP2) -> allocate -> init_weights
    (seeded, identical for any number of ranks) -> AdamW -> checkpoint manager -> resume ->
    loggers (the pieces: ``build.py``).

``Trainer.train()`` runs optimizer steps until ``train.max_steps`` / ``train.total_tokens``, a
preemption signal, or too many non-finite steps in a row. Each is ``step.train_step`` (the same
function the benchmark times) at the schedule's learning rate; its results stay on the device
until the monitor (``monitor.py``) reads them at a logging step, checkpoint or validation.
Validation (the loss of the val split): ``validation.py``; evaluation (loss and bits per byte of
the ``eval.sets`` texts): ``evaluator.py``.

No host-device sync in the hot loop; the only per-step cross-rank exchange is a one-int gloo
all-reduce of the preemption flag (host memory: it does not wait for the GPU).
"""

from __future__ import annotations

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
from kha_train.training.checkpoint import CheckpointManager
from kha_train.training.checkpoint_checks import STEP_DIR, check_free_space, stray_entries
from kha_train.training.determinism import make_deterministic
from kha_train.training.evaluator import build_evaluator
from kha_train.training.hf_export import HFExporter
from kha_train.training.loggers import RunLoggers
from kha_train.training.metrics import WindowTimer
from kha_train.training.monitor import NonFiniteError, StepMonitor
from kha_train.training.optim import build_optimizer, is_fused, summarize_groups
from kha_train.training.parallel import compiles, settings_line
from kha_train.training.runlock import RunLock, RunLockedError
from kha_train.training.schedule import lr_at
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
        self.monitor = StepMonitor(cfg, self.env, self.total_steps, self.run_dir)
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
        if self.env.is_main:
            try:
                (self.run_dir / "config.yaml").write_text(self.config_yaml)
            except OSError as e:
                raise storage_error(e, "write the run config", self.run_dir) from e
        self.log = RunLoggers(
            run_dir=self.run_dir, name=cfg.name, wandb_mode=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, wandb_entity=cfg.logging.wandb_entity,
            tensorboard=cfg.logging.tensorboard, config=self.config_dict,
            total_steps=self.total_steps, start_step=self.step,
            resumed=resume is not None, is_main=self.env.is_main, console_stream=console,
        )  # fmt: skip
        self._announce(resume)
        for note in [] if restored is None else restored.notes:
            self.log.info(f"warning: {note}")
        self._warn_about_storage()

    def _warn_about_storage(self) -> None:
        """Look-alike files in the checkpoint folder, and too little room for one checkpoint."""
        stray = stray_entries(self.ckpt_dir)
        if stray:
            self.log.info(
                f"warning: {self.ckpt_dir} holds {', '.join(stray)}, which look like checkpoints "
                "but are not complete kha-train checkpoints: they are never loaded"
            )
        n_params = sum(p.numel() for p in self.model.parameters())
        warning = check_free_space(self.ckpt_dir, n_params, self.cfg.checkpoint.keep_last)
        if warning:
            self.log.info(warning)

    def _announce(self, resume: Path | None) -> None:
        cfg, env = self.cfg, self.env
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        accum = self.loader.micro_batches_per_step
        groups = ", ".join(
            f"{g.name}: {g.num_tensors} tensors / {g.num_params / 1e6:.2f}M (wd {g.weight_decay})"
            for g in summarize_groups(self.optimizer)
        )
        impl = "fused" if self.fused else "foreach"
        self.log.info(
            f"{cfg.name}: {n_params / 1e6:.2f}M parameters on {env.world_size} rank(s) "
            f"({self.device.type}, {cfg.train.precision.value}); global batch "
            f"{self.tokens_per_step} tokens = {accum} micro-batch(es) x "
            f"{cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens x {env.world_size} rank(s); "
            f"{self.total_steps} steps; AdamW {impl} [{groups}]; run dir {self.run_dir}"
        )
        data_vocab = self.loader.index.vocab_size
        if cfg.model.vocab_size >= 2 * data_vocab and cfg.model.vocab_size - data_vocab >= 1024:
            unused = (cfg.model.vocab_size - data_vocab) * cfg.model.hidden_size
            self.log.info(
                f"warning: model.vocab_size={cfg.model.vocab_size} but the dataset's tokenizer "
                f"has {data_vocab} ids: {unused / 1e6:.1f}M embedding parameters are never "
                f"used. Set model.vocab_size={-(-data_vocab // 64) * 64} (the next multiple of "
                "64), or train a larger tokenizer"
            )
        if self.val_loader is None and cfg.train.val_batches > 0:
            self.log.info(
                f"warning: no validation: the val split of {cfg.data.dataset} is missing or "
                f"smaller than one micro-batch per rank ({cfg.train.micro_batch_size} x "
                f"{cfg.data.seq_len} tokens x {env.world_size}). Prepare the data with a larger "
                "--val-fraction, or set train.val_batches=0 to train without validation"
            )
        elif self.val_batches < cfg.train.val_batches:
            self.log.info(
                f"validation uses {self.val_batches} micro-batches per rank (train.val_batches="
                f"{cfg.train.val_batches}, but the val split holds only {self.val_batches})"
            )
        self.log.info("settings: " + settings_line(cfg, self.device, env.world_size))
        if resume is not None:
            self.log.info(f"resumed from {resume} at step {self.step}")

    # -- checkpoint state -------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """Everything besides model and optimizer that a resume needs (JSON-able, same on every
        rank). Call after ``_drain()``."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "tokens_seen": self.step * self.tokens_per_step,
            "loader": self.loader.state_dict(),
            **self.monitor.state_dict(),  # spikes, nonfinite
            "world_size": self.env.world_size,
        }

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        """Continue from the trainer state saved with checkpoint ``path`` (model and optimizer
        are already loaded)."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"{path}: trainer state version {state.get('version')}, expected {STATE_VERSION}"
            )
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.monitor.load_state_dict(state)

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
        )  # fmt: skip
        result = train_step(
            self.model, self.optimizer, micro_batches, parallel=self.cfg.parallel,
            grad_clip=self.cfg.optim.grad_clip, lr=lr, compute_loss=self.compute_loss,
            guard=self.monitor.guard, clipper=self.monitor.clipper,
        )  # fmt: skip
        ids = torch.cat([b.sample_ids for b in micro_batches])
        self.monitor.record(self.step + 1, result, ids, self.log)
        self.step += 1
        return result

    def _drain(self) -> None:
        """Read the device history into the monitor (a host sync; see ``monitor.py``)."""
        self.monitor.drain(self.step, self.log)

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
            self.log.close({"status": "completed", "step": self.step})
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
                    self.monitor.log_window(self.step, timer, self.log, self.model)
                if cfg.train.val_every and self.step % cfg.train.val_every == 0:
                    self.validate()
                if cfg.eval.every and self.step % cfg.eval.every == 0:
                    self.evaluate()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                self.ckpt.poll()
                self._export_published()
                if D.any_rank(self._stop_signal is not None):
                    stopped = True
                    break
            if stopped:
                if len(self.monitor.history):
                    self.monitor.log_window(self.step, timer, self.log, self.model)
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
            self._finish("preempted" if stopped else "completed")
            return 0
        except NonFiniteError:
            self._finish("nonfinite", exit_code=1)
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def run_steps(self, until: int) -> None:
        """Train up to optimizer step ``until`` and drain the monitor: no validation, evaluation,
        checkpoint or end record (``kha-train replay`` re-runs a stretch of a run with it)."""
        timer = WindowTimer()
        while self.step < min(until, self.total_steps):
            self._step(self.loader.next_step())
            timer.step()
            if self.step % self.cfg.logging.log_every == 0:
                self.monitor.log_window(self.step, timer, self.log, self.model)
        self._drain()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name

    def _finish(self, status: str, exit_code: int = 0) -> None:
        summary = {
            "status": status, "step": self.step, "tokens_seen": self.step * self.tokens_per_step,
            "nonfinite_skipped": self.monitor.skipped_total,
            "spike_skipped": self.monitor.spike_skipped_total,
            "spikes_total": self.monitor.detector.num_spikes,
        }  # fmt: skip
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
