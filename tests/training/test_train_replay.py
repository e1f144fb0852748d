"""`kha-train replay` (tools/replay.py): a spike caused by the data recurs when the steps around it
are re-run from the checkpoint before it, a transient one does not; on the CPU the replayed
losses equal the run's bitwise; and a run without a checkpoint before the spike gets one clear
error."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import records, tiny_config, train_here

from kha_train.config import ConfigError
from kha_train.data.order import GlobalOrder
from kha_train.data.shards import read_index
from kha_train.tools.replay import add_replay_arguments, run_replay
from kha_train.training.trainer import Trainer

SPIKE_STEP = 14
SECTIONS = dict(
    train={"max_steps": 18, "deterministic": True},
    schedule={"kind": "constant", "warmup_steps": 2},
    checkpoint={"every_steps": 4, "keep_last": 5},
    logging={"spikes": {"window": 16, "warmup": 6, "z_threshold": 3.0}},
)


def _replay(run: Path, step: int) -> dict:
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    out = run / "replay.json"
    try:
        run_replay(parser.parse_args([str(run), "--step", str(step), "--after", "2",
                                      "--json", str(out)]))  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(False)
    return json.loads(out.read_text())


def _poisoned_copy(dataset: Path, root: Path, step: int, cfg: dict) -> Path:
    """The dataset with the samples of optimizer step ``step`` replaced by random tokens."""
    data = root / "poisoned"
    shutil.copytree(dataset, data)
    index = read_index(data)
    [shard] = index.splits["train"].shards
    seq, per_step = (
        cfg["data"]["seq_len"],
        cfg["train"]["global_batch_tokens"] // cfg["data"]["seq_len"],
    )
    order = GlobalOrder(
        (index.splits["train"].tokens - 1) // seq, cfg["data"].get("seed", 1234), True
    )
    tokens = np.memmap(data / shard.file, dtype=np.uint16, mode="r+")
    rng = np.random.default_rng(0)
    for i in order.sample_ids((step - 1) * per_step, per_step):
        tokens[i * seq + 1 : i * seq + seq + 1] = rng.integers(2, index.vocab_size, seq)
    tokens.flush()
    return data


def test_a_data_spike_recurs_and_the_replay_is_exact(tmp_path, tiny_dataset) -> None:
    base = tiny_config(tmp_path / "unused", tiny_dataset, **SECTIONS)
    data = _poisoned_copy(tiny_dataset, tmp_path, SPIKE_STEP, base)
    run = tmp_path / "run"
    train_here(tiny_config(run, data, **SECTIONS))
    assert any(r["step"] == SPIKE_STEP for r in records(run, "spike")), records(run, "spike")
    report = _replay(run, SPIKE_STEP)
    assert report["from_checkpoint"] == 12 and report["recurs"] is True
    assert "recurs: its data causes it" in report["verdict"]
    # Deterministic on the CPU: the replayed steps 13..16 are the run's, bit for bit.
    assert [r["step"] for r in report["losses"]] == [13, 14, 15, 16]
    assert report["bitwise_equal"] is True


class _Glitch(Trainer):
    """A transient fault: the loss of one step is scaled up (not the data's doing)."""

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return loss * 8 if self.step + 1 == SPIKE_STEP else loss


def test_a_transient_spike_does_not_recur(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    train_here(tiny_config(run, tiny_dataset, **SECTIONS), _Glitch)
    assert any(r["step"] == SPIKE_STEP for r in records(run, "spike"))
    report = _replay(run, SPIKE_STEP)
    assert report["recurs"] is False and "does not recur" in report["verdict"]
    assert report["spike_replay"] == []
    with pytest.raises(ConfigError, match=r"no checkpoint of .* before step 3"):
        _replay(run, 3)
