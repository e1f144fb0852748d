"""The training loop.

``Trainer(cfg)`` builds everything in this order (each step needs the ones before it):

    validate the config for the real number of ranks -> process group + device -> data loaders
    (the dataset's tokenizer and vocab are checked against the config before any model exists)
    -> model on the meta device -> parallelize (AC, compile, FSDP2) -> allocate -> init_weights
    (seeded, identical for any number of ranks) -> AdamW -> checkpoint manager -> resume ->
    loggers.

``Trainer.train()`` runs optimizer steps until ``train.max_steps`` / ``train.total_tokens``, a
preemption signal, or too many non-finite steps in a row.

One optimizer step (``_step``):

    micro-batches of this rank                  (loader.next_step(): one global batch / ranks)
    for each: loss_i = model(x_i, y_i);  backward(loss_i * w_i)
        w_i = n_i * ranks / N with n_i the micro-batch's target tokens and N those of the global
        batch: FSDP averages gradients over ranks, so the step's gradient is exactly that of the
        mean loss over every target token of the global batch (= 1 / micro-batches when, as
        with the packed loader, every position has a target)
    loss  = sum over ranks of sum_i loss_i * w_i / ranks       (all-reduce on the device)
    gnorm = global gradient norm; clip to optim.grad_clip
    ok    = loss and gnorm are finite                          (a device tensor)
    AdamW step, applied only if ok (see "non-finite steps")
    MoE: counts of the step (all micro-batches) summed over ranks -> expert-bias update (if ok)

No host-device sync in the hot loop: loss, grad norm and the ok flag stay on the device (in a
small history buffer) until a logging step, checkpoint or validation reads them all at once. The
only per-step cross-rank exchange is a one-int gloo all-reduce of the preemption flag (host
memory: it does not wait for the GPU).

Non-finite steps: with the fused AdamW (the default on CUDA) the flag goes in as the kernel's
``found_inf`` argument: the kernel leaves parameters, both moments and the step count untouched
when it is set, decided on the device, no sync. The foreach implementation has no such input, so
there the trainer reads the flag on the host once per step (free on CPU; a sync per step on GPU,
so prefer fused there). The MoE bias update gets counts x ok, and a step with zero counts does not
move the bias. Skipped steps are counted; ``train.max_nonfinite_in_row`` consecutive ones abort
the run, detected at the next logging step (weights are never touched in between).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from kha_train.config import Config, ConfigError
from kha_train.config_checks import total_steps, validate
from kha_train.training import distributed as D
from kha_train.training.checkpoint import CheckpointManager, complete_checkpoints, resolve_resume
from kha_train.training.history import StepHistory
from kha_train.training.loggers import RunLoggers
from kha_train.training.metrics import (
    LossWindow,
    WindowTimer,
    moe_record,
    peak_flops,
    train_record,
)
from kha_train.training.optim import (
    build_optimizer,
    clip_gradients,
    global_grad_norm,
    is_fused,
    set_lr,
    summarize_groups,
)
from kha_train.training.parallel import (
    build_mesh,
    init_weights_like_single_device,
    parallelize,
    set_micro_batch_sync,
)
from kha_train.training.schedule import lr_at
from kha_train.training.spikes import SpikeDetector

STATE_VERSION = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Trainer:
    def __init__(self, cfg: Config, *, console: TextIO | None = None) -> None:
        validate(cfg, D.env_world_size())
        self.cfg = cfg
        self.env = D.init_distributed(cfg.train.device)
        self.device = self.env.device
        t = cfg.train
        self.total_steps = total_steps(cfg)
        self.tokens_per_step = t.global_batch_tokens
        # A Config built in Python (not loaded through OmegaConf) keeps the literal default.
        self.run_dir = Path(cfg.logging.run_dir.replace("${name}", cfg.name))
        self.ckpt_dir = (
            Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        )
        resume_path = self._resume_path()
        self._build_data()
        self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.fused = is_fused(self.optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        sp = cfg.logging.spikes
        self.detector = SpikeDetector(sp.window, sp.z_threshold, sp.warmup)
        self.ckpt = CheckpointManager(
            self.ckpt_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, self.env
        )
        self.step = 0  # optimizer steps done
        self.skipped_total = 0  # non-finite steps skipped (host copy, updated at drains)
        self.in_row = 0  # consecutive non-finite steps at the last drain
        if resume_path is not None:
            self._load(resume_path)
        self._init_step_state()
        self.config_yaml, self.config_dict = config_snapshot(cfg)
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
        self.log = RunLoggers(
            run_dir=self.run_dir, name=cfg.name, wandb_mode=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, wandb_entity=cfg.logging.wandb_entity,
            tensorboard=cfg.logging.tensorboard, config=self.config_dict,
            total_steps=self.total_steps, start_step=self.step,
            resumed=resume_path is not None, is_main=self.env.is_main, console_stream=console,
        )  # fmt: skip
        self._announce(resume_path)

    # -- building ---------------------------------------------------------------------------------

    def _resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        path = resolve_resume(resume, self.ckpt_dir)
        existing = complete_checkpoints(self.ckpt_dir)
        if resume == "none" and existing:
            raise ConfigError(
                f"{self.ckpt_dir} already holds checkpoints of an earlier run (newest: step "
                f"{existing[-1][0]}). Continue it with checkpoint.resume=auto, or start a new run "
                "elsewhere (logging.run_dir=... or checkpoint.dir=...), or delete that folder"
            )
        return path

    def _build_data(self) -> None:
        from kha_train.data import PackedLoader

        cfg, env = self.cfg, self.env
        tok_hash = None
        if cfg.data.tokenizer:
            from kha_train.data.tokenizer import load_tokenizer, tokenizer_hash

            tok_hash = tokenizer_hash(load_tokenizer(cfg.data.tokenizer))
        common = dict(
            seq_len=cfg.data.seq_len, micro_batch_size=cfg.train.micro_batch_size,
            global_batch_size=self.tokens_per_step // cfg.data.seq_len, rank=env.rank,
            world_size=env.world_size, seed=cfg.data.seed, device=self.device,
            prefetch=cfg.data.prefetch, expected_vocab_size=cfg.model.vocab_size,
            expected_tokenizer_hash=tok_hash,
        )  # fmt: skip
        self.loader = PackedLoader(cfg.data.dataset, "train", **common)
        # Validation needs one full micro-batch on every rank: (seq_len + 1) tokens per sample.
        val = self.loader.index.splits.get("val")
        need = (cfg.data.seq_len * cfg.train.micro_batch_size * env.world_size) + 1
        self.val_loader, self.val_batches = None, 0
        if val is not None and val.tokens >= need:
            self.val_loader = PackedLoader(cfg.data.dataset, "val", **common)
            # A small val split caps the pass (said once at startup, not at every pass).
            self.val_batches = min(cfg.train.val_batches, self.val_loader.num_eval_batches)

    def _build_model(self) -> None:
        from kha_train.model import Transformer, moe_layers

        cfg = self.cfg
        with torch.device("meta"):
            model = Transformer(cfg.model)
        mesh = build_mesh(cfg.parallel, self.device)
        parallelize(model, cfg.parallel, cfg.train.precision, self.device, mesh=mesh)
        model.to_empty(device=self.device)
        torch.manual_seed(cfg.train.seed)
        with init_weights_like_single_device():
            model.init_weights()
        model.train()
        self.model = model
        self.has_moe = bool(moe_layers(model))

    def _init_step_state(self) -> None:
        self.history = StepHistory(self.cfg.logging.log_every, self.device, self.in_row)
        self._last_counts: torch.Tensor | None = None
        self.window = LossWindow()  # host sums over the logging window (drains may split it)
        self._flops_per_token = self._model_flops()
        self._peak = peak_flops(self.device, self.cfg.logging.peak_tflops)

    def _model_flops(self) -> float | None:
        try:
            from kha_train.model.flops import train_flops_per_token

            return train_flops_per_token(self.cfg.model, self.cfg.data.seq_len)
        except Exception:  # accounting must never stop training
            return None

    def _announce(self, resume_path: Path | None) -> None:
        cfg, env = self.cfg, self.env
        n_params = sum(p.numel() for p in self.params)
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
        if self.val_loader is None:
            self.log.info(f"no validation: {cfg.data.dataset} has no usable val split")
        elif self.val_batches < cfg.train.val_batches:
            self.log.info(
                f"validation uses {self.val_batches} micro-batches per rank (train.val_batches="
                f"{cfg.train.val_batches}, but the val split holds only {self.val_batches})"
            )
        if resume_path is not None:
            self.log.info(f"resumed from {resume_path} at step {self.step}")

    # -- checkpoint state -------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """Everything besides model and optimizer that a resume needs (JSON-able, same on every
        rank). Call after ``_drain()``."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "tokens_seen": self.step * self.tokens_per_step,
            "loader": self.loader.state_dict(),
            "spikes": self.detector.state_dict(),
            "nonfinite": {"skipped_total": self.skipped_total, "in_row": self.in_row},
            "world_size": self.env.world_size,
        }

    def _load(self, path: Path) -> None:
        model_cfg = config_snapshot(self.cfg)[1]["model"]
        state = self.ckpt.load(path, self.model, self.optimizer, model_cfg)
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"{path}: trainer state version {state.get('version')}, expected {STATE_VERSION}"
            )
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.detector.load_state_dict(state["spikes"])
        self.skipped_total = int(state["nonfinite"]["skipped_total"])
        self.in_row = int(state["nonfinite"]["in_row"])

    def save_checkpoint(self, *, blocking: bool = False) -> Path:
        self._drain()
        path = self.ckpt.save(
            self.step, self.model, self.optimizer, self.trainer_state(), self.config_yaml,
            blocking=blocking,
        )  # fmt: skip
        self._last_saved = self.step
        self.log.event({"type": "checkpoint", "step": self.step, "path": str(path)})
        return path

    # -- one optimizer step -----------------------------------------------------------------------

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of one micro-batch (a method so tests can inject faults)."""
        return self.model(batch.input_ids, batch.labels)

    def _step(self, micro_batches: list[Any]) -> None:
        world = self.env.world_size
        n_tok = torch.stack([(b.labels != -100).sum() for b in micro_batches]).float()  # (A,)
        total = n_tok.sum()
        if world > 1:
            dist.all_reduce(total)
        weights = n_tok * world / total  # (A,)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            set_micro_batch_sync(self.model, self.cfg.parallel, last=i == len(micro_batches) - 1)
            loss = self.compute_loss(batch)
            (loss * weights[i]).backward()
            loss_sum += loss.detach().float() * weights[i]
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum / world  # the global batch's mean loss

        grad_norm = global_grad_norm(self.params)
        clip_gradients(self.optimizer, self.params, grad_norm, self.cfg.optim.grad_clip)
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)

        set_lr(
            self.optimizer,
            lr_at(
                self.step,
                peak_lr=self.cfg.optim.lr,
                total_steps=self.total_steps,
                cfg=self.cfg.schedule,
            ),
        )
        if self.fused:
            self.optimizer.found_inf = (~ok).float()  # the fused kernel skips the update if 1
            self.optimizer.step()
        elif ok.item():  # foreach has no device-side skip: one host read per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        if self.has_moe:
            from kha_train.model import collect_expert_counts, update_expert_bias

            counts = collect_expert_counts(self.model)  # (n_moe_layers, E), this rank
            if world > 1:
                dist.all_reduce(counts)
            update_expert_bias(self.model, counts * ok)  # zero counts: bias unchanged
            self._last_counts = counts

        # The loop drains at least every log_every steps; stepping by hand drains when full.
        if self.history.full:
            self._drain()
        ids = torch.cat([b.sample_ids for b in micro_batches])
        self.step += 1
        self.history.record(self.step, loss, grad_norm, ok, ids)

    # -- reading the device state (the host syncs) --------------------------------------------------

    def _drain(self) -> None:
        """Read the steps since the last drain: feed the spike detector, record skipped steps,
        and add to the logging window. Identical on every rank (the values are global)."""
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
            ids = self.history.gather_sample_ids(self.env.world_size, self.device)
            for s in spikes:
                s.sample_ids = ids[s.step]
            self.log.log_spikes(self.step, [s.to_dict() for s in spikes], self.detector.num_spikes)
            for v in bad:
                self.log.event(
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
                f"{drained.max_in_row} consecutive optimizer steps (up to step {self.step}) had a "
                f"non-finite loss or gradient norm, train.max_nonfinite_in_row={limit}: stopping. "
                "None of them was applied to the weights. Their sample ids are in "
                f"{self.run_dir / 'metrics.jsonl'} (type nonfinite). Lower optim.lr, check the "
                "data at those ids, or resume from the last checkpoint with checkpoint.resume=auto"
            )

    def _log_window(self, timer: WindowTimer) -> None:
        self._drain()
        elapsed, data_wait, steps = timer.read_and_reset()
        sched = self.cfg.schedule
        rec = train_record(
            step=self.step, total_steps=self.total_steps, tokens_per_step=self.tokens_per_step,
            lr=lr_at(max(0, self.step - 1), peak_lr=self.cfg.optim.lr,
                     total_steps=self.total_steps, cfg=sched),
            window=self.window, elapsed_s=elapsed, data_wait_s=data_wait, timed_steps=steps,
            world_size=self.env.world_size, flops_per_token=self._flops_per_token,
            peak_flops_per_device=self._peak, device=self.device,
        )  # fmt: skip
        rec["nonfinite_skipped"] = self.skipped_total
        rec["nonfinite_in_window"] = self.window.skipped
        rec["spikes_total"] = self.detector.num_spikes
        if self._last_counts is not None:
            rec.update(moe_record(self._last_counts))
        aux = getattr(self.model, "last_aux_loss", None)
        if aux is not None:
            rec["aux_loss"] = float(aux)
        self.window = LossWindow()
        self.log.log(rec)

    # -- validation -------------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean loss over ``train.val_batches`` micro-batches per rank of the val split."""
        if self.val_loader is None:
            return None
        self.model.eval()
        total = torch.zeros(2, device=self.device)  # sum of loss x tokens, tokens
        for batch in self.val_loader.eval_batches(self.val_batches):
            n = (batch.labels != -100).sum().float()
            total += torch.stack([self.model(batch.input_ids, batch.labels).float() * n, n])
        self.model.train()
        if self.env.world_size > 1:
            dist.all_reduce(total)
        val = (total[0] / total[1].clamp_min(1)).item()
        self.log.log({"type": "val", "step": self.step, "val_loss": val})
        return val

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
        self._stop_signal: str | None = None
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self._last_saved = self.step if self.step > 0 else -1
        stopped = False
        try:
            timer = WindowTimer()
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                micro_batches = self.loader.next_step()
                timer.add_data_wait(time.perf_counter() - t0)
                self._step(micro_batches)
                timer.step()
                self.log.advance(self.step)
                if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps:
                    self._log_window(timer)
                if cfg.train.val_every and self.step % cfg.train.val_every == 0:
                    self.validate()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                    self.save_checkpoint()
                self.ckpt.poll()
                if D.any_rank(self._stop_signal is not None):
                    stopped = True
                    break
            if stopped:
                if len(self.history):
                    self._log_window(timer)
                self.log.info(
                    f"stop requested ({self._stop_signal or 'signal on another rank'}) at step "
                    f"{self.step}: saving a checkpoint and exiting"
                )
            elif cfg.train.val_every == 0 or self.step % cfg.train.val_every:
                self.validate()  # the final validation
            if self._last_saved != self.step:
                self.save_checkpoint(blocking=True)
            self.ckpt.wait()
            self._finish("preempted" if stopped else "completed")
            return 0
        except NonFiniteError:
            self._finish("nonfinite", exit_code=1)
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signal.Signals(signum).name

    def _finish(self, status: str, exit_code: int = 0) -> None:
        summary = {
            "status": status, "step": self.step, "tokens_seen": self.step * self.tokens_per_step,
            "nonfinite_skipped": self.skipped_total, "spikes_total": self.detector.num_spikes,
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
        """Finish an in-flight async save (also after an error) and stop the loaders' threads."""
        try:
            self.ckpt.wait()
        except Exception as e:  # the run's own error, if any, is the one to report
            self.log.info(f"warning: the last async checkpoint did not complete: {e}")
        self.loader.close()
        if self.val_loader is not None:
            self.val_loader.close()


def config_snapshot(cfg: Config) -> tuple[str, dict[str, Any]]:
    """The resolved config as YAML text and as a plain dict. Without omegaconf (a minimal GPU
    image) the text is JSON, which is also valid YAML and loads with ``load_config``."""
    try:
        from kha_train.config import to_dict, to_yaml

        return to_yaml(cfg), to_dict(cfg)
    except ImportError:
        import dataclasses
        import enum
        import json

        def plain(x: Any) -> Any:
            if isinstance(x, enum.Enum):
                return x.value
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return x

        d = plain(dataclasses.asdict(cfg))
        return json.dumps(d, indent=1) + "\n", d
