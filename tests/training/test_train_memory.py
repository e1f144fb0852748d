"""Device-memory pressure: the CUDA allocator's retries are logged, shown and warned about once,
with fixes that fit the run's settings; the trainer asks for expandable segments."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from train_helpers import build, records, tiny_config, train_here

from kha_train.config import ConfigError
from kha_train.training import metrics
from kha_train.training.device_memory import (
    OutOfDeviceMemoryError,
    alloc_retry_warning,
    memory_fixes,
)
from kha_train.training.loggers import format_record
from kha_train.training.trainer import Trainer


def _train_with_retries(tmp_path, dataset, monkeypatch, counts: list[int]) -> tuple[list, str]:
    """Train 6 steps, logging steps 1, 2, 4 and 6, with the allocator's retry counter (since the
    start, as CUDA reports it) reading ``counts`` at those steps. The CPU has no caching
    allocator: its stats are stood in for."""
    seen = iter(counts)
    monkeypatch.setattr(
        metrics,
        "memory_stats",
        lambda device: {"mem_peak_alloc_gib": 1.0, "alloc_retries": next(seen)},
    )
    run = tmp_path / "run"
    console = io.StringIO()
    train_here(tiny_config(run, dataset, logging={"log_every": 2}), console=console)
    return records(run), console.getvalue()


def test_retries_are_logged_by_window_and_warned_about_once(
    tmp_path: Path, tiny_dataset, monkeypatch
) -> None:
    recs, text = _train_with_retries(tmp_path, tiny_dataset, monkeypatch, [0, 2, 5, 5])
    assert [r["alloc_retries"] for r in recs] == [0, 2, 3, 0]  # each window's own
    assert text.count("the CUDA allocator ran out of cached memory and retried") == 1, text
    assert "retried 2 time(s)" in text
    # One GPU: gathered weights are kept after the forward, no activation checkpointing.
    assert "parallel.reshard_after_forward=true" in text
    assert "parallel.activation_checkpointing=selective" in text
    assert "train.micro_batch_size (now 2;" in text
    assert "alloc retries 3" in text and "alloc retries 0" not in text  # the console lines


def test_retries_while_the_first_step_compiles_are_logged_not_warned_about(
    tmp_path: Path, tiny_dataset, monkeypatch
) -> None:
    recs, text = _train_with_retries(tmp_path, tiny_dataset, monkeypatch, [4, 4, 4, 4])
    assert [r["alloc_retries"] for r in recs] == [4, 0, 0, 0]
    assert "ran out of cached memory" not in text


def test_the_fixes_leave_out_what_the_run_already_does(tmp_path: Path) -> None:
    cfg = build(tiny_config(tmp_path / "run", tmp_path / "data", parallel={
        "reshard_after_forward": True, "activation_checkpointing": "selective"}))  # fmt: skip
    text = alloc_retry_warning(3, cfg, world_size=1)
    assert "reshard_after_forward" not in text
    assert "activation_checkpointing=full" in text and "=selective" not in text
    assert "train.micro_batch_size (now 2;" in text
    # Sharded over 8 ranks, null resolves to resharding: not suggested either.
    cfg = build(tiny_config(tmp_path / "run", tmp_path / "data"))
    assert "reshard_after_forward" not in alloc_retry_warning(3, cfg, world_size=8)
    assert "reshard_after_forward=true" in alloc_retry_warning(3, cfg, world_size=1)
    # Micro-batch 1, full checkpointing, the fused loss: only more GPUs is left.
    cfg = build(tiny_config(tmp_path / "run", tmp_path / "data", train={"micro_batch_size": 1},
                            parallel={"activation_checkpointing": "full",
                                      "reshard_after_forward": True}))  # fmt: skip
    cfg.parallel.loss_kernel = "cce"
    fixes = memory_fixes(cfg, 1)
    assert len(fixes) == 1 and fixes[0].startswith("more GPUs"), fixes
    # One process without FSDP2 keeps every bf16 weight: going back to FSDP2 is the fix.
    cfg.parallel.single_device = True
    fixes = memory_fixes(cfg, 1)
    assert fixes[0].startswith("parallel.single_device=false with"), fixes


def test_console_line_shows_retries_only_when_there_are_some() -> None:
    rec = {"type": "train", "step": 4, "loss": 2.0, "mem_peak_alloc_gib": 120.0}
    assert "alloc retries" not in format_record({**rec, "alloc_retries": 0}, 10)
    assert "alloc retries 6" in format_record({**rec, "alloc_retries": 6}, 10)


def test_the_trainer_asks_for_expandable_segments_unless_told_otherwise(
    monkeypatch, tmp_path
) -> None:
    from kha_train.training.commands import run

    # Set, then delete, so that monkeypatch restores the outside value (or its absence).
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError, match="not found"):  # after the allocator setting
        run(str(tmp_path / "missing.yaml"))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    # A value the user gave, under either name (torch >= 2.9 reads the newer one first), wins.
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    with pytest.raises(ConfigError, match="not found"):
        run(str(tmp_path / "missing.yaml"))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:256")
    with pytest.raises(ConfigError, match="not found"):
        run(str(tmp_path / "missing.yaml"))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ


class OutOfMemoryAt(Trainer):
    """Runs out of device memory in step 5's forward, as CUDA's allocator would report it."""

    def _step(self, micro_batches):
        if self.step + 1 == 5:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 192.00 MiB. GPU 0 has a total capacity "
                "of 139.80 GiB of which 3.12 MiB is free."
            )
        super()._step(micro_batches)


def test_out_of_memory_ends_the_run_with_the_fixes_and_the_checkpoint(tmp_path, tiny_dataset):
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset)  # checkpoints every 3 steps, 6 steps
    with pytest.raises(OutOfDeviceMemoryError) as info:
        train_here(cfg, OutOfMemoryAt)
    message = str(info.value)
    assert message.startswith("out of GPU memory after 4 completed step(s): CUDA out of memory.")
    assert "step_0000003, is intact" in message and "checkpoint.resume=auto" in message
    for fix in ("parallel.activation_checkpointing=selective", "parallel.reshard_after_forward",
                "train.micro_batch_size (now 2", "parallel.loss_kernel=cce", "more GPUs"):  # fmt: skip
        assert fix in message, fix
    assert type(info.value).__module__.startswith("kha_train")  # the CLI prints it, no traceback
    end = records(run, "end")[-1]
    assert end["status"] == "out_of_memory" and end["step"] == 4 and end["error"] == message
    # Nothing saved after the failure; the run resumes from step 3 with the suggested settings.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000003"]
    cfg["train"]["micro_batch_size"] = 1
    cfg["parallel"] = {"activation_checkpointing": "selective"}
    cfg["checkpoint"]["resume"] = "auto"
    train_here(cfg)
    assert records(run, "end")[-1]["status"] == "completed"
    assert [r["step"] for r in records(run)][-3:] == [4, 5, 6]
