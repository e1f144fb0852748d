"""The lines a run starts with, on the console and in the log (``Trainer`` prints them after
building everything): what the run is, the settings it resolved to, and warnings about its data,
validation, rollback and checkpoint folder. Text only: nothing here changes the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kha_train.training.checkpoint_checks import check_free_space, stray_entries
from kha_train.training.flat_adamw import FlatAdamW
from kha_train.training.optim import summarize_groups
from kha_train.training.parallel import settings_line

# ``t`` below is the Trainer (typed Any: this module is imported by trainer.py, not the reverse).


def storage_warnings(t: Any) -> list[str]:
    """Look-alike files in the checkpoint folder, and too little room for one checkpoint."""
    out: list[str] = []
    stray = stray_entries(t.ckpt_dir)
    if stray:
        out.append(
            f"warning: {t.ckpt_dir} holds {', '.join(stray)}, which look like checkpoints "
            "but are not complete kha-train checkpoints: they are never loaded"
        )
    n_params = sum(p.numel() for p in t.model.parameters())
    warning = check_free_space(t.ckpt_dir, n_params, t.cfg.checkpoint.keep_last)
    if warning:
        out.append(warning)
    return out


def start_lines(t: Any, resume: Path | None) -> list[str]:
    """What the run is (model, batch, steps, optimizer groups), the settings it resolved to,
    and warnings about its vocabulary, validation split, rollback and skipped data."""
    cfg, env = t.cfg, t.env
    out: list[str] = []
    n_params = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
    accum = t.loader.micro_batches_per_step
    groups = ", ".join(
        f"{g.name}: {g.num_tensors} tensors / {g.num_params / 1e6:.2f}M (wd {g.weight_decay})"
        for g in summarize_groups(t.optimizer)
    )
    impl = "fused" if t.fused else "foreach"
    if isinstance(t.optimizer, FlatAdamW):
        impl = "over flat buffers (parallel.single_device)"
    out.append(
        f"{cfg.name}: {n_params / 1e6:.2f}M parameters on {env.world_size} rank(s) "
        f"({t.device.type}, {cfg.train.precision.value}); global batch "
        f"{t.tokens_per_step} tokens = {accum} micro-batch(es) x "
        f"{cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens x {env.world_size} rank(s); "
        f"{t.total_steps} steps; AdamW {impl} [{groups}]; run dir {t.run_dir}"
    )
    data_vocab = t.loader.index.vocab_size
    if cfg.model.vocab_size >= 2 * data_vocab and cfg.model.vocab_size - data_vocab >= 1024:
        unused = (cfg.model.vocab_size - data_vocab) * cfg.model.hidden_size
        out.append(
            f"warning: model.vocab_size={cfg.model.vocab_size} but the dataset's tokenizer "
            f"has {data_vocab} ids: {unused / 1e6:.1f}M embedding parameters are never "
            f"used. Set model.vocab_size={-(-data_vocab // 64) * 64} (the next multiple of "
            "64), or train a larger tokenizer"
        )
    if t.val_loader is None and cfg.train.val_batches > 0:
        out.append(
            f"warning: no validation: the val split of {cfg.data.dataset} is missing or "
            f"smaller than one micro-batch per rank ({cfg.train.micro_batch_size} x "
            f"{cfg.data.seq_len} tokens x {env.world_size}). Prepare the data with a larger "
            "--val-fraction, or set train.val_batches=0 to train without validation"
        )
    elif t.val_batches < cfg.train.val_batches:
        out.append(
            f"validation uses {t.val_batches} micro-batches per rank (train.val_batches="
            f"{cfg.train.val_batches}, but the val split holds only {t.val_batches})"
        )
    out.append("settings: " + settings_line(cfg, t.device, env.world_size))
    if resume is not None:
        out.append(f"resumed from {resume} at step {t.step}")
    r = cfg.train.rollback
    if r.enabled:
        triggers = [f"{r.max_spikes} spiking steps within {r.window}"] if r.max_spikes else []
        if r.loss_rise:
            triggers.append(f"smoothed loss {r.loss_rise:.0%} up for {r.loss_rise_steps} steps")
        done = len(t.rollbacks.history)
        out.append(
            f"rollback: on ({' or '.join(triggers)}; at most {r.max_rollbacks}, {done} done)"
        )
        if cfg.checkpoint.keep_last < 2:
            out.append(
                "warning: train.rollback with checkpoint.keep_last=1: a checkpoint saved "
                "during a spike window replaces the only one before it, and the rollback "
                "then has nowhere to go. Keep 2 or more"
            )
    skipped = t.loader.skip_entries
    if skipped:
        n = sum(e["end"] - e["start"] for e in skipped)
        out.append(f"data: {len(skipped)} skipped range(s), up to {n} samples")
    return out
