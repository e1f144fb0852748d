"""Skip-step (optim.skip_step, training/spike_guard.py): injected spikes are skipped on the
device and leave the training state bitwise untouched; the guard follows a plain reference;
its state resumes exactly; two ranks decide alike."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from test_train_loop import StopAt, state_snapshot
from train_helpers import (
    REPO,
    build,
    losses,
    records,
    run_process,
    tiny_config,
    torchrun_cmd,
    train_here,
)

from kha_train.config import SkipStepConfig, load_config
from kha_train.training import distributed as D
from kha_train.training.spike_guard import (
    GRAD_NORM_SPIKE,
    LOSS_SPIKE,
    NONFINITE,
    RESET,
    SpikeGuard,
)
from kha_train.training.trainer import Trainer

# Skipping possible from step 5 (4 applied steps in the window); spikes are injected at step 6.
GUARD = {"enabled": True, "window": 8, "min_history": 4, "max_in_row": 3}
K = 6
NO_VAL = {"val_every": 0, "val_batches": 0}  # no validation pass at the end
BIT = {"loss": LOSS_SPIKE, "grad_norm": GRAD_NORM_SPIKE}


def guarded(run: Path, dataset: Path, **sections) -> dict:
    sections.setdefault("optim", {})["skip_step"] = GUARD
    return tiny_config(run, dataset, **sections)


class Inject(Trainer):
    """Injects one kind of spike into step ``at``."""

    kind: ClassVar[str] = ""
    at: ClassVar[int] = K

    def compute_loss(self, batch):
        here = self.step + 1 == self.at
        if here and self.kind == "repeated_tokens":  # a corrupted batch: one rare token
            batch = dataclasses.replace(
                batch,
                input_ids=torch.full_like(batch.input_ids, 500),
                labels=torch.full_like(batch.labels, 500),
            )
        loss = super().compute_loss(batch)
        if here and self.kind == "poisoned_gradient":  # every gradient x 1e4, the loss as it is
            loss.register_hook(lambda g: g * 1e4)
        return loss

    def _step(self, micro_batches):
        if self.kind == "lr_bump" and self.step + 1 == self.at:  # lr x 1000 for one step
            self.cfg.optim.lr *= 1000
            try:
                return super()._step(micro_batches)
            finally:
                self.cfg.optim.lr /= 1000
        return super()._step(micro_batches)


def steps(t: Trainer, n: int) -> list:
    return [t._step(t.loader.next_step()) for _ in range(n)]


def assert_untouched(before: dict, after: dict) -> None:
    assert any("expert_bias" in k for k in before) and any(".exp_avg_sq" in k for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"a skipped step changed {changed}"


@pytest.mark.parametrize(
    ("kind", "impl", "metric"),
    [
        ("repeated_tokens", "foreach", "grad_norm"),
        ("poisoned_gradient", "fused", "grad_norm"),
        ("lr_bump", "fused", "loss"),
    ],
)
def test_injected_spikes_are_skipped_and_leave_state_untouched(
    tmp_path, tiny_dataset, kind, impl, metric
) -> None:
    """Weights, AdamW's moments and step counts, and the expert biases are bitwise those of
    before the spike; the next normal step trains again. An lr bump cannot be seen before its
    update: the step after it (whose loss explodes) is the one skipped, and every later one, up
    to max_in_row: then the guard gives in and restarts its window."""
    run = tmp_path / "run"
    cfg = guarded(
        run, tiny_dataset, optim={"implementation": impl}, logging={"log_every": 4},
        train={"max_steps": 12, **NO_VAL},
    )  # fmt: skip
    Inject.kind, Inject.at = kind, K
    t = Inject(build(cfg), console=io.StringIO())
    try:
        first_skip = K + 1 if kind == "lr_bump" else K
        steps(t, first_skip - 1)
        before = state_snapshot(t)
        (r,) = steps(t, 1)
        assert not bool(r.ok) and int(r.flags) & BIT[metric]
        assert_untouched(before, state_snapshot(t))
        if kind == "lr_bump":  # the model stays broken: skipped up to the streak limit
            assert [bool(x.ok) for x in steps(t, 2)] == [False, False]
            assert_untouched(before, state_snapshot(t))
            (r,) = steps(t, 1)  # the 4th spike in a row is applied; the window starts over
            assert bool(r.ok) and int(r.flags) & RESET
        else:
            steps(t, 1)
        after = state_snapshot(t)
        assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])
        t._drain()
    finally:
        t.close()
        D.teardown()
    skips = records(run, "spike_skip")
    assert skips[0]["step"] == first_skip and metric in skips[0]["metrics"]
    assert skips[0][metric + "_z"] > 6 and len(skips[0]["sample_ids"]) == 8
    assert t.monitor.spike_skipped_total == len(skips) == (3 if kind == "lr_bump" else 1)
    # The logged detector (same window, threshold and test) flags the step, marked skipped.
    flagged = [s for s in records(run, "spike") if s["step"] == first_skip]
    assert flagged and all(s["skipped"] for s in flagged)
    if kind == "lr_bump":
        (reset,) = records(run, "spike_guard_reset")
        assert reset["step"] == first_skip + 3 and reset["skipped_in_row"] == 3


def reference_guard(series, window, z, min_history, max_in_row):
    """The rule of spike_guard.py, written plainly on the host."""
    kept: list[tuple[float, float]] = []  # applied steps since the last reset, oldest first
    in_row, out = 0, []
    for x in series:
        finite = all(math.isfinite(v) for v in x)
        spike = [False, False]
        last = kept[-window:]
        if finite and len(last) >= max(2, min_history):
            for m in range(2):
                vals = [v[m] for v in last]
                mean = sum(vals) / len(vals)
                std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                spike[m] = std > 0 and x[m] > mean + z * std
        reset = any(spike) and in_row >= max_in_row
        skip = any(spike) and not reset
        ok = finite and not skip
        in_row = in_row + 1 if skip else (0 if ok else in_row)
        if reset:
            kept = []
        if ok:
            kept.append(x)
        flags = (not finite) * NONFINITE + spike[0] * LOSS_SPIKE + spike[1] * GRAD_NORM_SPIKE
        out.append((ok, flags + reset * RESET))
    return out


def test_guard_follows_the_plain_rule_and_its_state_round_trips() -> None:
    """A long series with spikes, a NaN, an inf, a streak that trips the limit and a window
    that wraps around: every verdict as the host reference; state saved mid-way and loaded
    into a fresh guard continues identically; a smaller window keeps the newest values."""
    g = torch.Generator().manual_seed(0)
    base = torch.stack([3 - 0.01 * torch.arange(60.0), torch.ones(60)], 1)
    series = (base + 0.05 * torch.randn(60, 2, generator=g)).tolist()
    series[12] = [9.0, 1.0]  # a loss spike
    series[20] = [3.0, 50.0]  # a grad-norm spike
    series[25] = [float("nan"), 1.0]
    series[26] = [3.0, float("inf")]
    for i in range(40, 44):  # a streak: 3 skipped, the 4th applied with a reset
        series[i] = [20.0, 30.0]
    cfg = SkipStepConfig(enabled=True, window=8, z_threshold=6.0, min_history=5, max_in_row=3)
    want = reference_guard(series, 8, 6.0, 5, 3)

    def run(guard: SpikeGuard, part: list) -> list:
        out = []
        for loss, gnorm in part:
            v = guard.step(torch.tensor(loss), torch.tensor(gnorm))
            out.append((bool(v.ok), int(v.flags)))
        return out

    straight = SpikeGuard(cfg, torch.device("cpu"))
    assert run(straight, series) == want
    assert [f for _, f in want].count(LOSS_SPIKE | GRAD_NORM_SPIKE) == 3  # the streak
    assert sum(f & RESET > 0 for _, f in want) == 1 and sum(not ok for ok, _ in want) == 7

    first = SpikeGuard(cfg, torch.device("cpu"))
    got = run(first, series[:41])  # saved in the middle of the streak
    state = json.loads(json.dumps(first.state_dict()))
    resumed = SpikeGuard(cfg, torch.device("cpu"))
    resumed.load_state_dict(state)
    assert got + run(resumed, series[41:]) == want
    assert resumed.state_dict() == straight.state_dict()

    small = SpikeGuard(dataclasses.replace(cfg, window=4, min_history=4), torch.device("cpu"))
    small.load_state_dict(state)
    applied = [x for x, (ok, _) in zip(series[:41], want, strict=False) if ok]
    assert small.values.T.tolist() == applied[-4:]  # the newest, oldest first
    assert small.state_dict()["count"] == 4 and small.state_dict()["in_row"] == 1


def test_resume_restores_the_guard_and_the_clip_state_exactly(tmp_path, tiny_dataset) -> None:
    """Stop right after a skipped step (the guard mid-streak, AdaGC past its warmup), resume,
    go on: the same losses, bitwise, and the same trainer state as straight through."""
    Inject.kind, Inject.at = "poisoned_gradient", K
    straight, split = tmp_path / "straight", tmp_path / "split"
    sections = {
        "optim": {"clip_mode": "adagc", "adagc": {"warmup": 3}},
        "schedule": {"kind": "constant", "warmup_steps": 2},
        "train": {"max_steps": K + 2, **NO_VAL},
        "checkpoint": {"every_steps": 0},
    }

    train_here(guarded(straight, tiny_dataset, **sections), Inject)

    class InjectThenStop(Inject, StopAt):
        stop_at = K

    cfg = guarded(split, tiny_dataset, **sections)
    train_here(cfg, InjectThenStop)
    cfg["checkpoint"]["resume"] = "auto"
    t = train_here(cfg, Inject)
    n = K + 2
    assert losses(split) == losses(straight) and sorted(losses(split)) == list(range(1, n + 1))
    assert [r["step"] for r in records(split, "spike_skip")] == [K]
    a = json.loads((straight / f"checkpoints/step_{n:07d}/trainer_state.json").read_text())
    b = json.loads((split / f"checkpoints/step_{n:07d}/trainer_state.json").read_text())
    assert a == b and a["spike_skip"]["skipped_total"] == 1 and a["clip"]["mode"] == "adagc"
    assert len(a["clip"]["gamma"]) == sum(1 for p in t.model.parameters() if p.requires_grad)
    assert records(split, "end")[-1]["spike_skipped"] == 1


SCRIPT = """
import io, json, os, sys
sys.path.insert(0, {tests!r})
import torch
from train_helpers import build
from test_train_spike_guard import Inject
from kha_train.training import distributed as D
from kha_train.training.optim import tensor_grad_norms

class OnRank1(Inject):
    kind, at = "poisoned_gradient", {at}
    def compute_loss(self, batch):  # the poisoned gradient comes from rank 1's batch only
        if self.env.rank != 1:
            return super(Inject, self).compute_loss(batch)
        return super().compute_loss(batch)
    def _step(self, micro_batches):
        r = super()._step(micro_batches)
        self.verdicts.append([bool(r.ok), int(r.flags)])
        return r

cfg = json.load(open({cfg!r}))
t = OnRank1(build(cfg), console=io.StringIO())
t.verdicts = []
t.train()
# Per-tensor norms of sharded gradients against the full tensors' norms.
batch = t.loader.next_step()[0]
t.compute_loss(batch).backward()
grads = [p.grad for p in t.model.parameters() if p.grad is not None]
ours = tensor_grad_norms(grads)
full = torch.stack([g.full_tensor().norm() for g in grads])
out = {{"verdicts": t.verdicts, "state": t.monitor.state_dict(),
        "norm_err": float(((ours - full).abs() / full.clamp(min=1e-12)).max())}}
json.dump(out, open(os.path.join({out!r}, f"rank{{t.env.rank}}.json"), "w"))
t.close()
D.teardown()
"""


@pytest.mark.slow
def test_two_ranks_make_the_same_skip_decision(tmp_path, tiny_dataset) -> None:
    """FSDP2 on 2 gloo ranks, AdaGC on: a gradient poisoned on rank 1 only is skipped by both
    ranks (the grad norm is global); both hold the same guard and AdaGC state, whose
    per-tensor norms are those of the whole (sharded) tensors."""
    run = tmp_path / "run"
    cfg = guarded(
        run, tiny_dataset, train={"max_steps": K + 1, **NO_VAL},
        checkpoint={"every_steps": 0}, optim={"clip_mode": "adagc", "adagc": {"warmup": 3}},
    )  # fmt: skip
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    script = tmp_path / "two_ranks.py"
    tests = str(REPO / "tests" / "training")
    script.write_text(
        textwrap.dedent(SCRIPT.format(tests=tests, cfg=str(cfg_path), out=str(tmp_path), at=K))
    )
    proc = run_process(torchrun_cmd(2, str(script)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["verdicts"] == r1["verdicts"] and r0["state"] == r1["state"]
    assert [ok for ok, _ in r0["verdicts"]] == [s != K for s in range(1, K + 2)]
    assert r0["verdicts"][K - 1][1] & GRAD_NORM_SPIKE
    assert r0["norm_err"] < 1e-5 and r1["norm_err"] < 1e-5
    assert [r["step"] for r in records(run, "spike_skip")] == [K]


def test_paper_configs_turn_the_guard_on_and_the_tiny_ones_do_not() -> None:
    """One config of each folder (each extends its folder's base, or another folder's)."""
    paper = [f for f in (REPO / "configs" / "paper").iterdir() if f.is_dir()]
    folders = [*paper, REPO / "configs" / "tiny"]
    for path in (sorted(f.glob("*.yaml"))[-1] for f in folders):
        cfg = load_config(path, ["data.dataset=x"])
        assert cfg.optim.skip_step.enabled == ("paper" in path.parts), path
        assert cfg.optim.skip_step.window == 128 and cfg.optim.skip_step.z_threshold == 6.0
