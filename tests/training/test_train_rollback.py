"""Automatic rollback (train.rollback, training/rollback.py) and skipped data ranges
(data.skip_ranges): persistent spikes from poisoned samples roll the run back to the checkpoint
before them, their batches are never read again, a resume (after the rollback, or from before
it) is exact, the rollback limit stops the run, and two ranks roll back together."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import yaml
from test_train_loop import StopAt
from train_helpers import (
    REPO,
    _merge,
    build,
    losses,
    records,
    run_process,
    tiny_config,
    torchrun_cmd,
    train_here,
    write_config,
)

from kha_train.config import ConfigError, RollbackConfig, SpikeConfig, load_config
from kha_train.config_checks import validate
from kha_train.data.errors import DataError
from kha_train.data.loader import PackedLoader
from kha_train.data.order import GlobalOrder, SkipRanges
from kha_train.training.rollback import Rollbacks
from kha_train.training.spike_guard import LOSS_SPIKE, NONFINITE
from kha_train.training.step import StepResult
from kha_train.training.trainer import Trainer

B = 4  # samples per step: global_batch_tokens 128 / seq_len 32 (2 micro-batches on 1 rank)
SEED = 1234  # data.seed's default
GUARD = {"enabled": True, "window": 8, "min_history": 4, "max_in_row": 3}  # skips from step 5
ROLLBACK = {"enabled": True, "max_spikes": 3, "window": 4, "skip_margin": 1, "max_rollbacks": 2}
SKIPS = ["steps:2", "samples:44-47"]  # step 2's batch, and 4 samples later on
# Global indices each step takes: step 2's batch [4, 8) is skipped; steps 5-7 are poisoned, so
# the rollback at step 7 goes back to checkpoint 4 and skips steps 5-7 plus one more batch,
# [20, 36); after it, step 7 also steps over the manual [44, 48).
BEFORE = [(0, 4), (8, 12), (12, 16), (16, 20), (20, 24), (24, 28), (28, 32)]  # steps 1-7
AFTER = [(36, 40), (40, 44), (48, 52), (52, 56), (56, 60), (60, 64)]  # steps 5-10 again
TOL = 1e-5  # 2 ranks against 1 (as test_train_distributed.py)


def rb_config(run: Path, dataset: Path, **sections) -> dict:
    cfg = tiny_config(
        run, dataset,
        train={"max_steps": 10, "global_batch_tokens": 128, "val_every": 0, "val_batches": 0,
               "rollback": ROLLBACK},
        optim={"skip_step": GUARD}, schedule={"kind": "constant", "warmup_steps": 2},
        data={"skip_ranges": SKIPS}, checkpoint={"every_steps": 2, "keep_last": 5},
    )  # fmt: skip
    for name, values in sections.items():
        _merge(cfg.setdefault(name, {}), values)
    return cfg


def order(dataset: Path) -> GlobalOrder:
    n = PackedLoader(dataset, seq_len=32, micro_batch_size=2, global_batch_size=B).num_samples
    return GlobalOrder(n, SEED, shuffle=True)


def ids(o: GlobalOrder, ranges: list[tuple[int, int]]) -> list[list[int]]:
    return [o.sample_ids(a, b - a).tolist() for a, b in ranges]


class Poisoned(Trainer):
    """A micro-batch holding a sample of ``poison`` has its loss x 30 (a bad sample: the step
    spikes whenever it is read); every step's sample ids go to ``seen``."""

    poison: ClassVar[set[int]] = set()

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return loss * 30 if set(batch.sample_ids.tolist()) & self.poison else loss

    def _step(self, micro_batches):
        if not hasattr(self, "seen"):
            self.seen = []
        self.seen.append((self.step + 1, torch.cat([b.sample_ids for b in micro_batches]).tolist()))
        return super()._step(micro_batches)


def poison_for(dataset: Path) -> set[int]:
    """The first sample of each of steps 5-7."""
    o = order(dataset)
    return {int(o.sample_ids(a, 1)[0]) for a, _ in BEFORE[4:]}


def state(run: Path, step: int) -> dict:
    return json.loads((run / f"checkpoints/step_{step:07d}/trainer_state.json").read_text())


def events(run: Path, name: str = "metrics.jsonl") -> list[tuple[str, int]]:
    """(type, step) of the records of a run's log, timing-free types only."""
    keep = {"train", "spike", "spike_skip", "rollback", "checkpoint"}
    recs = [json.loads(line) for line in (run / name).read_text().splitlines()]
    return [(r["type"], r["step"]) for r in recs if r["type"] in keep]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_dataset) -> tuple[Path, list]:
    """One rank, 10 steps, poisoned samples at steps 5-7: a rollback at step 7 to step 4."""
    run = tmp_path_factory.mktemp("straight") / "run"
    Poisoned.poison = poison_for(tiny_dataset)
    t = train_here(rb_config(run, tiny_dataset), Poisoned)
    return run, t.seen


def test_rollback_goes_back_before_the_spikes_and_never_reads_their_batches(
    straight, tiny_dataset
) -> None:
    run, seen = straight
    o = order(tiny_dataset)
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10]
    assert [i for _, i in seen] == ids(o, BEFORE) + ids(o, AFTER)
    skipped = {i for a, b in [(4, 8), (20, 36), (44, 48)] for i in o.sample_ids(a, b - a)}
    after = {i for _, step_ids in seen[7:] for i in step_ids}
    assert not after & skipped and not after & Poisoned.poison
    (rb,) = records(run, "rollback")
    assert {k: rb[k] for k in ("step", "from_step", "to_step", "window", "skipped_steps")} == {
        "step": 4, "from_step": 7, "to_step": 4, "window": [5, 7], "skipped_steps": [5, 8]
    }  # fmt: skip
    assert rb["skipped_samples"] == [20, 36] and rb["skipped_count"] == 16 and rb["count"] == 1
    assert rb["checkpoint"] == "step_0000004" and rb["discarded"] == ["step_0000006"]
    assert rb["reason"] == "spikes" and rb["spiking_steps"] == [5, 6, 7]
    # The log is the run's one timeline; the abandoned steps are in rolled_back.jsonl.
    assert sorted(losses(run)) == list(range(1, 11))
    gone = [json.loads(x) for x in (run / "rolled_back.jsonl").read_text().splitlines()]
    assert {r["rolled_back_by"] for r in gone} == {1}
    assert [r["step"] for r in gone if r["type"] in ("train", "spike_skip")] == [5, 5, 6, 6, 7, 7]
    assert all(r["step"] <= 4 for r in records(run, "spike_skip"))
    (end,) = records(run, "end")
    assert end["status"] == "completed" and end["rollbacks"] == 1
    # The counters come back with the checkpoint; what the abandoned steps flagged and skipped
    # is counted by the rollback and added back in the end record.
    gone_spikes = sum(r["type"] == "spike" for r in gone)
    assert gone_spikes >= 1 and rb["spikes_abandoned"] == gone_spikes
    assert rb["skips_abandoned"] == 3 and end["spike_skipped_rolled_back"] == 3
    assert end["spikes_rolled_back"] == gone_spikes
    # Checkpoint 6 is the one saved after the rollback; the loader state holds every range.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step_{s:07d}" for s in (2, 4, 6, 8, 10)
    ]
    assert len(state(run, 6)["rollback"]["history"]) == 1
    assert len(state(run, 4)["rollback"]["history"]) == 0
    ranges = state(run, 10)["loader"]["skip_ranges"]
    assert [(e["start"], e["end"], e["source"]) for e in ranges] == [
        (44, 48, "manual"), (4, 8, "manual"), (20, 36, "rollback")
    ]  # samples: ranges resolve first, then steps: ranges in order  # fmt: skip
    # The saved config lists every skipped range: a run from it reads the same data.
    for path in (run / "config.yaml", run / "checkpoints/step_0000010/config.yaml"):
        saved = yaml.safe_load(path.read_text())["data"]["skip_ranges"]
        assert saved == ["samples:4-7", "samples:20-35", "samples:44-47"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_rollback_with_async_saves_takes_the_same_steps(straight, tmp_path, tiny_dataset) -> None:
    """checkpoint.async_save: the rollback waits for the save in flight, restores the same
    checkpoint and reads the same batches; the losses equal the blocking-save run's."""
    run, seen = straight
    async_run = tmp_path / "async"
    ckpt = {"every_steps": 2, "keep_last": 5, "async_save": True}
    t = train_here(rb_config(async_run, tiny_dataset, checkpoint=ckpt), Poisoned)
    assert t.seen == seen
    (rb,) = records(async_run, "rollback")
    assert rb["checkpoint"] == "step_0000004" and rb["skipped_samples"] == [20, 36]
    assert losses(async_run) == losses(run)


class PoisonedStop(Poisoned, StopAt):
    stop_at = 8  # after the rollback (the steps before it reach 7)


class Crash(Exception):
    pass


class CrashAfterRollback(Poisoned):
    """Dies right after the rollback, before a checkpoint holds it."""

    def _roll_back(self, d):
        if super()._roll_back(d):
            raise Crash


@pytest.mark.parametrize("cut", ["stop_after", "crash_at_rollback"])
def test_resume_is_exact(straight, tmp_path, tiny_dataset, cut) -> None:
    """stop_after: preempted at step 8, resumed from the checkpoint saved then (it holds the
    rollback). crash_at_rollback: killed right after the rollback, resumed from the newest
    checkpoint, 4 (6 was discarded), which knows nothing of it: the run meets the spikes
    again and rolls back the same way. Either way: bitwise the losses, samples, trainer state
    and logs of the straight run."""
    ref, ref_seen = straight
    run = tmp_path / "run"
    cfg = rb_config(run, tiny_dataset)
    Poisoned.poison = poison_for(tiny_dataset)
    if cut == "stop_after":
        first = train_here(cfg, PoisonedStop)
        assert records(run, "end")[-1]["status"] == "preempted"
    else:
        with pytest.raises(Crash):
            train_here(cfg, CrashAfterRollback)
        assert not (run / "checkpoints/step_0000006").exists()
        assert records(run, "rollback")  # logged before the crash; the resume drops it
    cfg["checkpoint"]["resume"] = "auto"
    second = train_here(cfg, Poisoned)
    if cut == "stop_after":
        assert first.seen == ref_seen[:11] and second.seen == ref_seen[11:]  # steps 9, 10
    else:  # from step 5: the poisoned steps again, the rollback, the steps after it
        assert second.seen == ref_seen[4:]
    assert losses(run) == losses(ref)  # bitwise, every step of the timeline
    a, b = state(ref, 10), state(run, 10)
    assert a == b and len(a["rollback"]["history"]) == 1
    assert events(run) == events(ref)
    assert events(run, "rolled_back.jsonl") == events(ref, "rolled_back.jsonl")
    assert [r["count"] for r in records(run, "rollback")] == [1]


def test_rollback_limit_stops_the_run_with_a_clear_error(tmp_path, tiny_dataset, capsys) -> None:
    """Spikes tied to the steps (not the data) come back after every rollback: with
    max_rollbacks=1, the second trigger stops the run (exit code 2, one error line), keeping
    every checkpoint."""
    from kha_train.cli import main

    run = tmp_path / "run"
    cfg = rb_config(run, tiny_dataset, train={"rollback": {"max_rollbacks": 1}})
    path = write_config(tmp_path / "cfg.yaml", cfg)

    def spiky(self, batch):  # the steps 5-7 spike, whatever their data
        loss = self.model(batch.input_ids, batch.labels)
        return loss * 30 if 5 <= self.step + 1 <= 7 else loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "compute_loss", spiky)
        assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error: spikes persist at step 7" in err and "max_rollbacks=1" in err
    assert [r["from_step"] for r in records(run, "rollback")] == [7]
    (end,) = records(run, "end")
    assert end["status"] == "rollback_limit" and end["rollbacks"] == 1 and end["step"] == 7
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004", "step_0000006",
    ]  # fmt: skip


class NaNFirst(Trainer):
    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return loss * float("nan") if self.step < 3 else loss


def test_no_checkpoint_before_the_spikes_logs_it_and_trains_on(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    cfg = rb_config(run, tiny_dataset, train={"max_steps": 4})
    t = train_here(cfg, NaNFirst)
    assert t.step == 4 and not records(run, "rollback")
    (rec,) = records(run, "rollback_unavailable")
    assert rec["step"] == 3 and rec["first_step"] == 1 and rec["spiking_steps"] == [1, 2, 3]
    assert records(run, "end")[0]["status"] == "completed"


SCRIPT = """
import io, json, os, sys
sys.path.insert(0, {tests!r})
from train_helpers import build
from test_train_rollback import Poisoned
from kha_train.training import distributed as D

Poisoned.poison = set({poison!r})
t = Poisoned(build(json.load(open({cfg!r}))), console=io.StringIO())
t.train()
json.dump({{"seen": t.seen, "state": t.trainer_state()}},
          open(os.path.join({out!r}, f"rank{{t.env.rank}}.json"), "w"))
t.close()
D.teardown()
"""


@pytest.mark.slow
def test_two_ranks_roll_back_together(straight, tmp_path, tiny_dataset) -> None:
    """FSDP2 on 2 gloo ranks: both roll back at the same step to the same checkpoint, skip the
    same samples, and end where 1 rank does (losses to fp32 rounding, the same samples, the
    same skipped ranges and rollback record)."""
    ref, ref_seen = straight
    run = tmp_path / "run"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(rb_config(run, tiny_dataset)))
    script = tmp_path / "two_ranks.py"
    tests = str(REPO / "tests" / "training")
    script.write_text(
        textwrap.dedent(
            SCRIPT.format(
                tests=tests,
                poison=sorted(poison_for(tiny_dataset)),
                cfg=str(cfg_path),
                out=str(tmp_path),
            )
        )
    )
    proc = run_process(torchrun_cmd(2, str(script)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert [s for s, _ in r0["seen"]] == [s for s, _ in r1["seen"]] == [s for s, _ in ref_seen]
    both = [a + b for (_, a), (_, b) in zip(r0["seen"], r1["seen"], strict=True)]
    assert both == [i for _, i in ref_seen]  # rank 0's half, then rank 1's: the global batch
    assert r0["state"] == r1["state"]
    one = state(ref, 10)
    assert r0["state"]["loader"]["skip_ranges"] == one["loader"]["skip_ranges"]
    assert r0["state"]["rollback"]["history"] == one["rollback"]["history"]
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, 11))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=TOL, abs=TOL), (s, got[s], want[s])


# -- pieces --------------------------------------------------------------------------------------


def test_skip_ranges_arithmetic() -> None:
    s = SkipRanges([(10, 12), (4, 6), (5, 8), (20, 20)])
    assert s.ranges == ((4, 8), (10, 12))
    assert [s.next_kept(i) for i in (0, 4, 7, 8, 10, 12)] == [0, 8, 8, 8, 12, 12]
    assert s.segments(2, 6) == [(2, 4), (8, 10), (12, 14)]
    assert s.end_after(2, 6) == 14 and s.advance(2, 4) == 12 and s.advance(0, 0) == 0
    assert s.covers(4, 8) and s.covers(10, 12) and not s.covers(3, 5) and not s.covers(7, 10)
    o = GlobalOrder(30, 3, shuffle=True)
    assert (
        s.sample_ids(o, 2, 6).tolist()
        == o.sample_ids(2, 2).tolist() + o.sample_ids(8, 2).tolist() + o.sample_ids(12, 2).tolist()
    )


def make(dataset: Path, skips=(), **kw) -> PackedLoader:
    kw = {"seq_len": 32, "micro_batch_size": 2, "global_batch_size": B, "seed": SEED, **kw}
    return PackedLoader(dataset, skip_ranges=list(skips), **kw)


def step_ids(loader: PackedLoader, n: int) -> list[list[int]]:
    return [torch.cat([b.sample_ids for b in loader.next_step()]).tolist() for _ in range(n)]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_skips_exactly_and_resumes_exactly(tiny_dataset, prefetch) -> None:
    """The steps read the global order without the skipped ranges; the state holds them, so a
    resume (any rank count) continues exactly; skip_steps (a rollback's) skips what the next
    steps would read."""
    o = order(tiny_dataset)
    # Steps 2-3 of the order without 10-13 read [4, 10) and [14, 16): [4, 16) is skipped.
    skips = ["samples:10-13", "steps:2-3"]
    ld = make(tiny_dataset, skips, prefetch=prefetch)
    got = step_ids(ld, 3)
    assert got == ids(o, [(0, 4), (16, 20), (20, 24)])
    st = ld.state_dict()
    assert st["step"] == 3 and st["sample_index"] == 24
    assert [(e["start"], e["end"], e.get("spec")) for e in st["skip_ranges"]] == [
        (10, 14, "samples:10-13"), (4, 16, "steps:2-3")
    ]  # fmt: skip
    assert ld.skip_steps(5, 6, source="rollback", rollback=1) == (28, 36)
    assert step_ids(ld, 2) == ids(o, [(24, 28), (36, 40)])
    st = ld.state_dict()
    ld.close()
    # A resume on 2 ranks, where the config lost a range (kept: it is in the past) and gained
    # one ahead: steps:9 is the batch the step 9 of this timeline would read.
    ranks = [
        make(tiny_dataset, ["steps:2-3", "steps:9"], rank=r, world_size=2, micro_batch_size=1)
        for r in range(2)
    ]
    for r in ranks:
        r.load_state_dict(st)
    both = [a + b for a, b in zip(step_ids(ranks[0], 4), step_ids(ranks[1], 4), strict=True)]
    assert both == ids(o, [(40, 44), (44, 48), (48, 52), (56, 60)])  # step 9's [52, 56) skipped
    assert not ranks[0].notes
    # Ranges already trained on cannot be added; one only ahead that is no longer configured is
    # dropped, with a note.
    with pytest.raises(DataError, match=r"resumes at step 5"):
        make(tiny_dataset, ["steps:2-3", "steps:4-6"]).load_state_dict(st)
    with pytest.raises(DataError, match=r"global sample 40"):
        make(tiny_dataset, ["samples:30-40"]).load_state_dict(st)
    ahead = make(tiny_dataset, ["samples:100-103"])
    state = {**ahead.state_dict()}
    again = make(tiny_dataset, [])
    again.load_state_dict(state)
    assert not again.skip_entries and "no longer lists 'samples:100-103'" in again.notes[0]


def result(loss: float, gnorm: float = 1.0, flags: int = 0) -> StepResult:
    t = torch.tensor
    return StepResult(t(loss), t(gnorm), t(True), None, t(flags, dtype=torch.int32), t([0.0, 0.0]))


def test_trigger_rules_and_their_state() -> None:
    """Spike count within a window (guard flags, non-finite steps, detector spikes), the loss
    rise over a smoothed level, and a state that continues exactly."""
    spikes = SpikeConfig(window=8, z_threshold=6.0, warmup=100)  # the detector stays quiet
    cfg = RollbackConfig(enabled=True, max_spikes=3, window=5)
    r = Rollbacks(cfg, spikes)
    flags = {3: LOSS_SPIKE, 6: NONFINITE, 10: LOSS_SPIKE, 11: LOSS_SPIKE, 13: NONFINITE}
    fired = []
    for step in range(1, 14):
        r.record(step, result(5.0 - 0.01 * step, flags=flags.get(step, 0)))
        if step in (4, 8, 13):
            d = r.observe()
            fired.append(d and (d.first_step, d.step))
            r.take_decision()
    assert fired == [None, None, (10, 13)]  # 3 and 6 too far apart; 10, 11, 13 within 5
    # A loss that rises 20% over its smoothed low for 3 applied steps; warmup 2.
    cfg = RollbackConfig(
        enabled=True, max_spikes=0, loss_rise=0.2, loss_rise_steps=3, loss_smoothing=0.5,
        loss_rise_warmup=2,
    )  # fmt: skip
    series = [4.0, 3.0, 2.0, 2.0, 1.9, 8.0, 8.0, 8.0, 8.0, 8.0]
    whole = Rollbacks(cfg, spikes)
    for step, loss in enumerate(series, 1):
        whole.record(step, result(loss))
    d = whole.observe()
    assert d is not None and d.reason == "loss_rise" and d.first_step == 6 and d.step == 8
    assert d.detail["low_step"] == 5
    # Saved mid-way (JSON), loaded into a fresh one: the same decision.
    part = Rollbacks(cfg, spikes)
    for step, loss in enumerate(series[:6], 1):
        part.record(step, result(loss))
    assert part.observe() is None
    saved = json.loads(json.dumps(part.state_dict()))
    resumed = Rollbacks(cfg, spikes)
    resumed.load_state_dict(saved, {"spikes": part.detector.state_dict()})
    for step, loss in enumerate(series[6:], 7):
        resumed.record(step, result(loss))
    d2 = resumed.observe()
    assert (d2.first_step, d2.step, d2.detail) == (d.first_step, d.step, d.detail)
    resumed.give_up(d2.step)  # no checkpoint: the high level becomes the reference
    resumed.take_decision()
    resumed.record(11, result(8.0))
    assert resumed.observe() is None


def test_config_checks() -> None:
    def errors(**sections) -> str:
        cfg = tiny_config(Path("/tmp/x"), Path("/tmp/d"), **sections)
        with pytest.raises(ConfigError) as e:
            validate(build(cfg))
        return str(e.value)

    msg = errors(data={"skip_ranges": ["steps:0-3", "rows:1-2", "samples:9-3"]})
    assert "'steps:0-3'" in msg and "'rows:1-2'" in msg and "'samples:9-3'" in msg
    msg = errors(train={"rollback": {"enabled": True, "max_spikes": 0}})
    assert "both triggers are off" in msg
    msg = errors(train={"rollback": {"max_spikes": 9, "window": 4, "lr_factor": 2.0}})
    assert "can never be reached" in msg and "lr_factor=2.0" in msg
    msg = errors(train={"rollback": {"enabled": True}}, checkpoint={"every_steps": 0})
    assert "checkpoint.every_steps > 0" in msg


def test_paper_configs_turn_rollback_on_and_the_tiny_ones_do_not() -> None:
    paper = [f for f in (REPO / "configs" / "paper").iterdir() if f.is_dir()]
    for path in (sorted(f.glob("*.yaml"))[-1] for f in [*paper, REPO / "configs" / "tiny"]):
        cfg = load_config(path, ["data.dataset=x"])
        assert cfg.train.rollback.enabled == ("paper" in path.parts), path
        validate(cfg)  # with every_steps > 0, as rollback needs
