"""Device-memory pressure: the CUDA allocator's retries are logged, shown and warned about once,
with fixes that fit the run's settings; the trainer asks for expandable segments."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from train_helpers import build, records, tiny_config, train_here

from kha_train.config import ConfigError
from kha_train.training import metrics
from kha_train.training.loggers import format_record
from kha_train.training.monitor import alloc_retry_warning


def test_retries_are_logged_and_warned_about_once(
    tmp_path: Path, tiny_dataset, monkeypatch
) -> None:
    # The CPU has no caching allocator: stand in for CUDA's stats, as its counter would read
    # (cumulative: none in the first window, 2 by the second, 5 by the third).
    seen = iter([0, 2, 5, 5, 5, 5, 5, 5])
    monkeypatch.setattr(
        metrics,
        "memory_stats",
        lambda device: {"mem_peak_alloc_gib": 1.0, "alloc_retries": next(seen)},
    )
    run = tmp_path / "run"
    console = io.StringIO()
    train_here(tiny_config(run, tiny_dataset, logging={"log_every": 2}), console=console)
    recs = records(run)
    assert [r["alloc_retries"] for r in recs] == [0, 2, 5, 5]
    text = console.getvalue()
    assert text.count("the CUDA allocator ran out of cached memory and retried") == 1, text
    assert "retried 2 time(s)" in text
    # One GPU: gathered weights are kept after the forward, no activation checkpointing.
    assert "parallel.reshard_after_forward=true" in text
    assert "parallel.activation_checkpointing=selective" in text
    assert "train.micro_batch_size (now 2)" in text
    assert "alloc retries 5" in text  # the console line


def test_the_warning_leaves_out_what_the_run_already_does(tmp_path: Path) -> None:
    cfg = build(tiny_config(tmp_path / "run", tmp_path / "data", parallel={
        "reshard_after_forward": True, "activation_checkpointing": "selective"}))  # fmt: skip
    text = alloc_retry_warning(3, cfg, world_size=1)
    assert "reshard_after_forward" not in text and "activation_checkpointing" not in text
    assert "train.micro_batch_size (now 2)" in text
    # Sharded over 8 ranks, null resolves to resharding: not suggested either.
    cfg = build(tiny_config(tmp_path / "run", tmp_path / "data"))
    assert "reshard_after_forward" not in alloc_retry_warning(3, cfg, world_size=8)
    assert "reshard_after_forward=true" in alloc_retry_warning(3, cfg, world_size=1)


def test_console_line_shows_retries_only_when_there_are_some() -> None:
    rec = {"type": "train", "step": 4, "loss": 2.0, "mem_peak_alloc_gib": 120.0}
    assert "alloc retries" not in format_record({**rec, "alloc_retries": 0}, 10)
    assert "alloc retries 6" in format_record({**rec, "alloc_retries": 6}, 10)


def test_the_trainer_asks_for_expandable_segments_unless_told_otherwise(
    monkeypatch, tmp_path
) -> None:
    from kha_train.training.commands import run

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with pytest.raises(ConfigError, match="not found"):  # after the allocator setting
        run(str(tmp_path / "missing.yaml"))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    with pytest.raises(ConfigError, match="not found"):
        run(str(tmp_path / "missing.yaml"))
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
