"""The training loop in this process (one rank): run directory, W&B offline, exact resume,
non-finite steps, spikes, wrong checkpoints, AC and precision variants."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from train_helpers import build, losses, records, tiny_config, train_here

from kha_train.config import ConfigError
from kha_train.data.loader import PackedLoader
from kha_train.training import distributed as D
from kha_train.training.trainer import NonFiniteError, Trainer

train = train_here  # this file's name for it


class StopAt(Trainer):
    """Behaves as if SIGTERM arrived during step ``stop_at``."""

    stop_at = 4

    def _step(self, micro_batches):
        super()._step(micro_batches)
        if self.step == self.stop_at:
            self._stop_signal = "SIGTERM"


def test_run_directory_wandb_offline_and_falling_loss(tmp_path: Path, tiny_dataset: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(
        run, tiny_dataset,
        train={"max_steps": 12, "val_every": 6},
        checkpoint={"every_steps": 6},
        logging={"log_every": 4, "wandb": "offline"},
    )  # fmt: skip
    train(cfg)
    assert (run / "config.yaml").read_text().startswith("name: tiny-test")
    recs = records(run)
    assert [r["step"] for r in recs] == [1, 4, 8, 12]  # the first step at once, then every 4
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.3, "loss did not fall"
    for key in ("grad_norm", "lr", "tokens_per_s", "mem_peak_rss_gib", "data_wait_frac", "eta_s"):
        assert key in recs[-1], key
    assert len(recs[-1]["moe_max_violation"]) == 2 and "moe_dead_experts" in recs[-1]
    # The window's mean grad norm of each model part (training/grad_parts.py), and in W&B's view.
    parts = recs[-1]["grad_norm_parts"]
    assert set(parts) == {"embedding", "norms", "head_mixing", "router", "experts", "attention"}
    assert all(v > 0 for v in parts.values()) and max(parts.values()) < recs[-1]["grad_norm"]
    from kha_train.training.metrics import flatten

    assert flatten(recs[-1])["grad_norm_parts/router"] == parts["router"]
    # KHA-MLP on V in both layers: its drift from the identity, 0 at init, grows.
    assert len(recs[-1]["kha_drift"]) == 2 and recs[0]["kha_drift"] < recs[-1]["kha_drift"]
    assert recs[-1]["tokens_seen"] == 12 * 256
    assert [r["step"] for r in records(run, "val")] == [6, 12]
    assert [r["status"] for r in records(run, "end")] == ["completed"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000006",
        "step_0000012",
    ]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "spikes.jsonl").exists()
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb")), "no offline W&B run"


def test_exact_resume_is_bitwise(tmp_path: Path, tiny_dataset: Path) -> None:
    """4 steps, stop (as on SIGTERM), resume, 4 more == 8 straight; async saves on one side."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config(straight, tiny_dataset, train={"max_steps": 8}))
    cfg = tiny_config(split, tiny_dataset, train={"max_steps": 8}, checkpoint={"async_save": True})
    train(cfg, StopAt)
    assert sorted(losses(split)) == [1, 2, 3, 4]
    assert [r["status"] for r in records(split, "end")] == ["preempted"]
    cfg["checkpoint"]["resume"] = "auto"
    train(cfg)
    assert losses(split) == losses(straight)  # bitwise: exact float equality, all 8 steps
    assert sorted(losses(split)) == list(range(1, 9))  # each step logged once
    a = json.loads((straight / "checkpoints/step_0000008/trainer_state.json").read_text())
    b = json.loads((split / "checkpoints/step_0000008/trainer_state.json").read_text())
    assert a == b  # data position, spike windows, counters
    # Resuming a finished run does nothing (and logs nothing twice).
    before = (split / "metrics.jsonl").read_text()
    train(cfg)
    assert (split / "metrics.jsonl").read_text() == before


def test_stop_after_the_last_step_completes_the_run(tmp_path: Path, tiny_dataset: Path) -> None:
    """A SIGTERM that comes during the last step (or its evaluation) stops nothing: the run is
    completed, so a study runner does not wait for a resume that has nothing to do. A log
    whose end record says otherwise (older kha-train) is completed by a resume."""

    class StopAtLast(StopAt):
        stop_at = 6

    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, train={"max_steps": 6})
    train(cfg, StopAtLast)
    assert [(r["status"], r["step"]) for r in records(run, "end")] == [("completed", 6)]
    log = run / "metrics.jsonl"
    log.write_text(log.read_text().replace('"status": "completed"', '"status": "preempted"'))
    cfg["checkpoint"]["resume"] = "auto"
    train(cfg)
    assert [r["status"] for r in records(run, "end")] == ["preempted", "completed"]
    before = log.read_text()
    train(cfg)  # completed: nothing to do, nothing logged
    assert log.read_text() == before


class NaNAt(Trainer):
    """Injects a NaN into the loss of the steps in ``bad``."""

    bad: ClassVar[set[int]] = set()

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return loss * float("nan") if self.step + 1 in self.bad else loss


def state_snapshot(t: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
           for k, v in t.model.state_dict().items()}  # fmt: skip
    for i, s in enumerate(t.optimizer.state.values()):
        for k, v in s.items():
            out[f"optim.{i}.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_nan_step_is_skipped_not_applied_and_counted(tmp_path, tiny_dataset, impl) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_dataset, optim={"implementation": impl})
    NaNAt.bad = {3}
    t = NaNAt(build(cfg), console=io.StringIO())
    try:
        assert t.fused == (impl == "fused")
        for _ in range(2):
            t._step(t.loader.next_step())
        before = state_snapshot(t)
        assert any("expert_bias" in k for k in before)
        t._step(t.loader.next_step())  # the NaN step
        after = state_snapshot(t)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed == [], f"a non-finite step changed {changed}"
        t._step(t.loader.next_step())  # a good step trains again
        assert not torch.equal(state_snapshot(t)["model.norm.weight"], after["model.norm.weight"])
        t._drain()
        assert t.monitor.skipped_total == 1 and t.monitor.in_row == 0
        (rec,) = records(tmp_path / "run", "nonfinite")
        assert rec["step"] == 3 and rec["loss"] == "nan" and len(rec["sample_ids"]) == 8
    finally:
        t.close()
        D.teardown()


def test_consecutive_nan_steps_abort_with_a_clear_message(tmp_path, tiny_dataset) -> None:
    cfg = tiny_config(
        tmp_path / "run", tiny_dataset,
        train={"max_steps": 20, "max_nonfinite_in_row": 3}, logging={"log_every": 4},
        checkpoint={"every_steps": 0},
    )  # fmt: skip
    NaNAt.bad = set(range(3, 100))
    with pytest.raises(NonFiniteError, match=r"consecutive .* train.max_nonfinite_in_row=3"):
        train(cfg, NaNAt)
    run = tmp_path / "run"
    # Read at the logging steps 4 and 8: 6 in a row by step 8, none of them applied.
    assert [r["step"] for r in records(run, "nonfinite")] == [3, 4, 5, 6, 7, 8]
    assert [r["status"] for r in records(run, "end")] == ["nonfinite"]


class SpikeAt(Trainer):
    spike_step = 10

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return loss * 30 if self.step + 1 == self.spike_step else loss


def test_synthetic_spike_is_logged_with_the_batch_sample_ids(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, train={"max_steps": 12}, logging={"log_every": 5})
    train(cfg, SpikeAt)
    spikes = [json.loads(line) for line in (run / "spikes.jsonl").read_text().splitlines()]
    loss_spikes = [s for s in spikes if s["metric"] == "loss"]
    assert [s["step"] for s in loss_spikes] == [10]
    s = loss_spikes[0]
    assert s["z"] > 6 and s["value"] == pytest.approx(30 * s["mean"], rel=0.5)
    # The global sample indices of step 10: what the loader yields as its 10th global batch.
    loader = PackedLoader(
        tiny_dataset, seq_len=32, micro_batch_size=2, global_batch_size=8, seed=1234, prefetch=0
    )
    for _ in range(9):
        loader.next_step()
    expected = torch.cat([b.sample_ids for b in loader.next_step()]).tolist()
    assert s["sample_ids"] == expected
    assert records(run, "spike")[0]["step"] == 10  # also in metrics.jsonl
    assert records(run)[-1]["spikes_total"] >= 1


def test_wrong_checkpoints_are_refused(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    train(tiny_config(run, tiny_dataset, train={"max_steps": 2}))
    with pytest.raises(ConfigError, match=r"already holds checkpoints.*checkpoint\.resume=auto"):
        Trainer(build(tiny_config(run, tiny_dataset)), console=io.StringIO())
    D.teardown()
    cfg = tiny_config(run, tiny_dataset, model={"hidden_size": 32}, checkpoint={"resume": "auto"})
    with pytest.raises(ConfigError) as err:
        Trainer(build(cfg), console=io.StringIO())
    msg = str(err.value)
    assert "embed_tokens.weight: checkpoint [512, 64], this model [512, 32]" in msg
    assert "model.hidden_size: 64 vs 32" in msg


def test_dataset_vocab_is_checked_before_the_model_is_built(tmp_path, tiny_dataset) -> None:
    cfg = tiny_config(tmp_path / "run", tiny_dataset, model={"vocab_size": 256})
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        Trainer(build(cfg), console=io.StringIO())


def test_activation_checkpointing_gives_the_same_losses(tmp_path, tiny_dataset) -> None:
    out = {}
    for mode in ("none", "full", "every_n", "selective"):
        cfg = tiny_config(
            tmp_path / mode, tiny_dataset, train={"max_steps": 3},
            parallel={"activation_checkpointing": mode, "ac_every_n": 2},
        )  # fmt: skip
        train(cfg)
        out[mode] = losses(tmp_path / mode)
    assert out["full"] == pytest.approx(out["none"], rel=1e-6)
    assert out["every_n"] == pytest.approx(out["none"], rel=1e-6)
    assert out["selective"] == pytest.approx(out["none"], rel=1e-6)


def test_bf16_mixed_precision_and_a_dense_model_train(tmp_path, tiny_dataset) -> None:
    fp32 = tmp_path / "fp32"
    train(tiny_config(fp32, tiny_dataset, train={"max_steps": 2}))
    bf16 = tmp_path / "bf16"
    train(tiny_config(bf16, tiny_dataset, train={"max_steps": 2, "precision": "bf16"}))
    assert losses(bf16)[1] == pytest.approx(losses(fp32)[1], rel=2e-2)
    dense = tmp_path / "dense"
    cfg = tiny_config(
        dense, tiny_dataset, train={"max_steps": 2}, model={"moe": {"num_experts": 0}}
    )
    train(cfg)
    assert len(losses(dense)) == 2 and "moe_max_violation" not in records(dense)[-1]


def test_fused_clipping_inside_the_update_matches_explicit_clipping(tmp_path, tiny_dataset) -> None:
    """The fused optimizer clips through its grad_scale input; foreach clips the gradients
    first. A small grad_clip makes every step clip."""
    states = {}
    for impl in ("fused", "foreach"):
        cfg = tiny_config(
            tmp_path / impl, tiny_dataset, optim={"implementation": impl, "grad_clip": 0.05}
        )
        t = Trainer(build(cfg), console=io.StringIO())
        try:
            for _ in range(3):
                t._step(t.loader.next_step())
            t._drain()
            states[impl] = state_snapshot(t)
            window = t.monitor.window
            assert window.steps == 3 and window.grad_norm / 3 > 0.05  # clipping was active
        finally:
            t.close()
            D.teardown()
    assert states["fused"].keys() == states["foreach"].keys()
    for k in states["fused"]:
        torch.testing.assert_close(
            states["fused"][k], states["foreach"][k], rtol=1e-5, atol=1e-6, msg=k
        )
