"""Explaining spikes (training/spike_explain.py, tools/spikes_report.py): at the drain that finds
a spike, its batch is scored again and its samples of the highest loss are decoded into the
spike record; `kha-train spikes RUN_DIR` prints them with what was done about each spike."""

from __future__ import annotations

import io
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_loggers import FakeRun, fake_wandb, make_logger
from test_train_loop import state_snapshot
from train_helpers import REPO, build, records, run_process, tiny_config, torchrun_cmd

from kha_train.cli import main
from kha_train.config import ConfigError
from kha_train.data.loader import PackedLoader
from kha_train.data.shards import read_index
from kha_train.data.tokenizer import load_tokenizer
from kha_train.training import distributed as D
from kha_train.training.trainer import Trainer

K = 10  # the spike step; the guard may skip from step 5, the detector flag from step 5
END = K + 2  # the last step and the drain that scores step K's batch
SEQ = 32
GUARD = {"enabled": True, "window": 8, "min_history": 4, "max_in_row": 3}


class SpikeAt(Trainer):
    """The loss of step ``K`` x 30 (a sure loss spike, which the spike guard skips)."""

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        return loss * 30 if self.step + 1 == K else loss


def config(run: Path, dataset: Path, **sections) -> dict:
    base = {
        "optim": {"skip_step": GUARD},
        "train": {"max_steps": END, "val_every": 0, "val_batches": 0},
        "checkpoint": {"every_steps": 0},
        "logging": {"log_every": 4},  # drains at 1, 4, 8, 12: step K is scored at step 12
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return tiny_config(run, dataset, **base)


def poisoned_copy(dataset: Path, root: Path) -> tuple[Path, list[int], int, list[int]]:
    """A copy of ``dataset`` in which one sample of step K's batch is random tokens (uniform
    over the vocab: the young model, which has learned the tokens' frequencies, finds them far
    less likely than text). Returns the copy, step K's sample ids, the poisoned one and its
    tokens."""
    data = root / "data"
    shutil.copytree(dataset, data)
    loader = PackedLoader(
        data, seq_len=SEQ, micro_batch_size=2, global_batch_size=8, seed=1234, prefetch=0
    )
    try:
        for _ in range(K - 1):
            loader.next_step()
        ids = torch.cat([b.sample_ids for b in loader.next_step()]).tolist()
    finally:
        loader.close()
    bad = ids[5]
    index = read_index(data)
    (shard,) = [s for s in index.splits["train"].shards if s.tokens]
    tokens = np.memmap(data / shard.file, dtype=index.dtype, mode="r+")
    poison = np.random.default_rng(0).integers(1, index.vocab_size, SEQ + 1)
    poison[poison == index.eos_id] = 1
    tokens[bad * SEQ : bad * SEQ + SEQ + 1] = poison
    tokens.flush()
    del tokens
    return data, ids, bad, poison.tolist()


@pytest.fixture(scope="module")
def spiked_run(tmp_path_factory, tiny_dataset) -> dict:
    """One rank, END steps, the loss of step K x 30 (skipped by the guard); one of its samples
    is poisoned on disk."""
    root = tmp_path_factory.mktemp("explain")
    data, ids, bad, poison = poisoned_copy(tiny_dataset, root)
    run = root / "run"
    console = io.StringIO()
    t = SpikeAt(build(config(run, data)), console=console)
    try:
        t.train()
        rescored = rescore(t, data)
    finally:
        t.close()
        D.teardown()
    return {"run": run, "data": data, "ids": ids, "bad": bad, "poison": poison,
            "console": console.getvalue(), "explained": t.monitor.explainer.explained,
            "rescored": rescored}  # fmt: skip


def test_the_spike_record_holds_the_poisoned_sample_decoded(spiked_run) -> None:
    run, bad = spiked_run["run"], spiked_run["bad"]
    spikes = [s for s in records(run, "spike") if s["step"] == K]
    assert spikes and all(s["skipped"] for s in spikes)
    explained = [s for s in spikes if "top_samples" in s]
    assert len(explained) == 1  # the step's spike record of the highest z carries them
    s = explained[0]
    assert s["z"] == max(x["z"] for x in spikes)
    assert s["scored_at_step"] == END  # the drain after the spike: its weights
    top = s["top_samples"]
    assert len(top) == 3 and [x["loss"] for x in top] == sorted(x["loss"] for x in top)[::-1]
    assert top[0]["id"] == bad and {x["id"] for x in top} <= set(spiked_run["ids"])
    assert top[0]["loss"] > top[1]["loss"] + 0.2 and top[0]["loss"] > s["scored_batch_loss"] + 0.3
    tok = load_tokenizer(spiked_run["data"] / "tokenizer.json")
    text = tok.decode(spiked_run["poison"])
    assert top[0]["text"] == text[:500] and top[0]["truncated"] == (len(text) > 500)
    assert all(x["text"] for x in top)  # every kept sample is decoded
    # The spike guard's record of the step (flagged by the detector too) holds no copy.
    (skip,) = records(run, "spike_skip")
    assert skip["step"] == K and "top_samples" not in skip
    assert f"sample {bad} has the highest loss of its batch" in spiked_run["console"]
    assert spiked_run["explained"] == 1
    state = json.loads((run / f"checkpoints/step_{END:07d}/trainer_state.json").read_text())
    assert state["spike_explain"] == {"explained": 1}


def test_kha_train_spikes_prints_the_spike_and_the_decoded_samples(
    spiked_run, tmp_path, capsys
) -> None:
    run, bad = spiked_run["run"], spiked_run["bad"]
    out = tmp_path / "report.json"
    assert main(["spikes", str(run), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    tok = load_tokenizer(spiked_run["data"] / "tokenizer.json")
    decoded = tok.decode(spiked_run["poison"])
    row = next(line for line in text.splitlines() if line.split()[:1] == [str(K)])
    assert "skipped" in row and "3 decoded" in row
    assert f"step {K} (skipped;" in text and f"scored at step {END}" in text
    assert f"#1 sample {bad}: loss" in text
    assert decoded.split()[0] in text  # the decoded text itself
    report = json.loads(out.read_text())
    (spike,) = [r for r in report["spikes"] if r["step"] == K]
    assert spike["action"] == "skipped" and spike["top_samples"][0]["id"] == bad
    # The part of the model its grad norm came from (training/grad_parts.py), in the row too.
    assert spike["grad_norm_from"] != "-" and spike["grad_norm_from"] in row
    assert spike["top_samples"][0]["text"] == decoded[:500] and spike["scored_at_step"] == END
    assert len(spike["sample_ids"]) == 8 and report["rollbacks"] == []
    # --json -: the JSON alone on stdout
    assert main(["spikes", str(run / "metrics.jsonl"), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out) == report | {"run_dir": str(run / "metrics.jsonl")}


def test_scoring_moves_nothing_of_the_training_state(spiked_run) -> None:
    """Weights, AdamW state, MoE expert biases and counts, the train mode and the RNG are those
    of before; the losses are the model's mean loss of each sample (the loader's batches)."""
    r = spiked_run["rescored"]
    assert r["changed"] == [] and r["counts_unchanged"] and r["training"] and r["rng_unchanged"]
    assert [x["id"] for x in r["samples"]] == [i for _, i in r["want"]]
    assert [x["loss"] for x in r["samples"]] == pytest.approx([v for v, _ in r["want"]], rel=1e-5)
    assert r["batch_loss"] == pytest.approx(r["mean"], rel=1e-5)


def rescore(t: Trainer, data: Path) -> dict:
    """Step K's batch scored again by the explainer, after the run, and what changed."""
    loader = PackedLoader(
        data, seq_len=SEQ, micro_batch_size=2, global_batch_size=8, seed=1234, prefetch=0
    )
    try:
        for _ in range(K - 1):
            loader.next_step()
        batches = loader.next_step()
    finally:
        loader.close()
    ids = torch.cat([b.sample_ids for b in batches]).tolist()
    before = state_snapshot(t)
    counts = [m.expert_counts.clone() for m in t.model.modules() if hasattr(m, "expert_counts")]
    rng = torch.get_rng_state()
    e = t.monitor.explainer.explain(t.model, [K], {K: ids}, END)[K]
    out = {"training": t.model.training, "rng_unchanged": torch.equal(torch.get_rng_state(), rng)}
    after = state_snapshot(t)
    out["changed"] = [k for k in before if not torch.equal(before[k], after[k])]
    now = [m.expert_counts for m in t.model.modules() if hasattr(m, "expert_counts")]
    out["counts_unchanged"] = bool(counts) and all(
        torch.equal(a, b) for a, b in zip(counts, now, strict=True)
    )
    with torch.no_grad():
        t.model.eval()
        per = torch.cat([t.model(b.input_ids, b.labels, reduction="none").mean(1)
                         for b in batches])  # fmt: skip
        t.model.train()
    out["want"] = sorted(zip(per.tolist(), ids, strict=True), key=lambda x: -x[0])[:3]
    out.update(samples=e.samples, batch_loss=e.batch_loss, mean=per.mean().item())
    return out


def test_limits_and_off(tmp_path, tiny_dataset) -> None:
    """explain_top per drain (highest z first), explain_max per run, explain_top=0: off."""
    from kha_train.training.spike_explain import SpikeExplainer

    cfg = build(config(tmp_path / "run", tiny_dataset, logging={"spikes": {
        "window": 16, "warmup": 4, "explain_top": 2, "explain_max": 3}}))  # fmt: skip
    ex = SpikeExplainer(cfg, 0, 1)
    assert ex.choose({5: 7.0, 9: 30.0, 7: 12.0}) == [9, 7]
    assert ex.choose({11: 8.0, 12: 9.0}) == [12]  # one left of explain_max=3
    assert ex.choose({13: 50.0}) == [] and not ex.enabled
    cfg.logging.spikes.explain_top = 0
    assert SpikeExplainer(cfg, 0, 1).choose({5: 7.0}) == []
    raw = config(tmp_path / "r2", tiny_dataset, logging={"spikes": {"explain_samples": 0}})
    from kha_train.config_checks import validate

    with pytest.raises(ConfigError, match="explain_samples must be >= 1"):
        validate(build(raw))


def write_metrics(path: Path, recs: list[dict | str]) -> Path:
    """A metrics.jsonl of ``recs`` (a str: a raw line)."""
    path.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in recs]
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return path


def spike(step: int, metric: str = "loss", z: float = 9.0, **kw) -> dict:
    return {"type": "spike", "step": step, "metric": metric, "value": 5.0, "mean": 3.0,
            "std": 0.2, "z": z, "ratio": 1.7, "loss": 5.0, "grad_norm": 1.0,
            "sample_ids": [1, 2], "skipped": False, **kw}  # fmt: skip


def test_report_actions_and_rollbacks(tmp_path, capsys) -> None:
    """logged / skipped / guard reset / non-finite, and a rollback (training/rollback.py: the
    abandoned steps' records moved to rolled_back.jsonl): its spikes are rolled back; the steps
    trained again after it are new rows."""
    abandoned = [
        spike(15, "grad_norm", z=20.0, skipped=True, top_samples=[
            {"id": 7, "loss": 9.5, "text": "bad\ntext", "truncated": True}],
            scored_at_step=16, scored_batch_loss=4.0),
        {"type": "spike_skip", "step": 15, "metrics": ["grad_norm"], "loss": 5.0,
         "grad_norm": 9.0, "loss_z": 1.0, "grad_norm_z": 21.0, "sample_ids": [1, 2]},
        {"type": "train", "step": 16, "loss": 4.0},
        {"type": "nonfinite", "step": 17, "loss": "nan", "grad_norm": 1.0, "sample_ids": [3]},
    ]  # fmt: skip
    run = write_metrics(tmp_path / "run", [
        {"type": "train", "step": 10, "loss": 3.0},
        spike(12),
        {"type": "rollback", "step": 14, "count": 1, "from_step": 18, "to_step": 14,
         "reason": "spikes", "window": [15, 18], "skipped_samples": [112, 160]},
        spike(15, z=7.0),  # the replay of step 15 (other data): a spike again, applied
        {"type": "spike_guard_reset", "step": 30, "metrics": ["loss"], "loss": 6.0,
         "grad_norm": 1.0, "loss_z": 8.0, "grad_norm_z": 0.5, "sample_ids": [4]},
        '{"type": "spike", "step": 31, "metr',  # a line cut by a crash
    ])  # fmt: skip
    (run / "rolled_back.jsonl").write_text(
        "".join(json.dumps({**r, "rolled_back_by": 1}) + "\n" for r in abandoned)
    )
    from kha_train.tools.spikes_report import build_report, format_report

    rows = build_report(run).rows
    assert [(r.step, r.action) for r in rows] == [
        (12, "logged"), (15, "skipped, rolled back"), (17, "skipped, rolled back"),
        (15, "logged"), (30, "guard reset"),
    ]  # fmt: skip
    assert rows[1].grad_norm_z == 20.0 and rows[1].loss_z == 1.0  # detector's z, else guard's
    assert rows[1].metrics == ["grad_norm"] and rows[2].metrics == ["non-finite"]
    assert rows[1].rollback_step == 18 and rows[4].loss_z == 8.0
    text = format_report(build_report(run))
    assert "rollback 1 at step 18 (spikes): back to the checkpoint of step 14" in text
    assert "global samples [112, 160) skipped" in text
    assert "step 15 (skipped, rolled back; loss z 1.0, grad norm z 20.0)" in text
    assert "#1 sample 7: loss 9.5" in text and "      bad\n      text [...]" in text
    assert main(["spikes", str(run), "--top", "0"]) == 0
    assert "#1 sample" not in capsys.readouterr().out


def test_several_runs_compared_step_by_step(tmp_path, capsys) -> None:
    """`kha-train spikes A B C`: a step that spikes in several runs on the same batch is the
    data's; one whose batches differ is not called so; a study archive (.gz) is read too."""
    import gzip

    explained = {"top_samples": [{"id": 5, "loss": 9.0, "text": "the verse"}],
                 "grad_norm_parts": {"embedding": 4.0, "experts": 3.0}}  # fmt: skip
    a = write_metrics(tmp_path / "study/a", [spike(700, "grad_norm", z=70.0, sample_ids=[5, 6],
                                                   **explained),
                                             spike(40, z=8.0, sample_ids=[1, 2])])  # fmt: skip
    b = write_metrics(tmp_path / "study/b", [spike(700, "grad_norm", z=10.0, sample_ids=[6, 5]),
                                             spike(90, z=7.0, sample_ids=[3])])  # fmt: skip
    c = write_metrics(tmp_path / "other/a", [
        spike(90, z=6.5, sample_ids=[4]),
        {"type": "rollback", "step": 30, "count": 1, "from_step": 50, "to_step": 30},
        {"type": "nonfinite", "step": 700, "loss": "nan", "grad_norm": 1.0, "sample_ids": [5, 6]},
    ])  # fmt: skip
    # Step 40 spiked in c too, then a rollback abandoned it: its record is in rolled_back.jsonl.
    rolled = json.dumps({**spike(40, z=9.0, sample_ids=[2, 1]), "rolled_back_by": 1}) + "\n"
    for name, text in (("metrics.jsonl", (c / "metrics.jsonl").read_text()),
                       ("rolled_back.jsonl", rolled)):  # fmt: skip
        (c / name).unlink(missing_ok=True)
        (c / f"{name}.gz").write_bytes(gzip.compress(text.encode()))  # as study.py archives

    assert main(["spikes", str(a), str(b), str(c), "--json", str(tmp_path / "cmp.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 runs, 3 spike step(s); 2 spiked in several runs on the same batch")
    rows = {line.split()[0]: line for line in out.splitlines()[3:6]}
    assert rows["700"].split()[1:6] == ["3/3", "10.0-70.0", "(+non-finite)", "same", "the"]
    assert rows["700"].split()[-3:] == ["embedding", "64%", "all"]  # a's split (the highest z)
    assert rows["40"].split()[1:5] == ["2/3", "8.0-9.0", "same", "the"]  # c's rolled back
    assert rows["40"].endswith(" study/a, other/a")  # two runs named a: with the folder above
    assert rows["90"].split()[1:5] == ["2/3", "6.5-7.0", "differs", "other"]  # batches [3], [4]
    # The data's spike, explained by run a: its samples follow the table.
    assert "study/a: step 700 (logged; grad norm z 70.0)" in out
    assert "  #1 sample 5: loss 9\n      the verse" in out
    data = json.loads((tmp_path / "cmp.json").read_text())
    assert [(r["step"], r["verdict"]) for r in data["steps"]] == [
        (700, "the data's"), (40, "the data's"), (90, "other batches")]  # fmt: skip
    assert len(data["runs"]) == 3 and data["steps"][0]["z"]["other/a"] == "inf"


def test_report_of_a_run_without_spikes_and_of_no_run(tmp_path, capsys) -> None:
    run = write_metrics(tmp_path / "run", [{"type": "train", "step": 1, "loss": 3.0}])
    assert main(["spikes", str(run)]) == 0
    assert "no spikes logged" in capsys.readouterr().out
    assert main(["spikes", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "does not exist" in err


def test_wandb_table_has_the_action_the_top_sample_and_the_part(tmp_path, monkeypatch) -> None:
    run = FakeRun(fail_log=False)
    fake_wandb(monkeypatch, lambda **kw: run)
    logger, _ = make_logger(tmp_path)
    top = [{"id": 7, "loss": 9.5, "text": "bad  text\n"}]
    parts = {"grad_norm_parts": {"router": 3.0, "experts": 1.0, "attention": 0.0}}
    logger.log_spikes(6, [spike(6, skipped=True, top_samples=top, **parts),
                          spike(6, "grad_norm")], 2)  # fmt: skip
    logger.log_spikes(9, [spike(9)], 3)
    logger.mark_rolled_back(10, to_step=5)
    _, columns, rows = run.logged[-1][1]["spikes/table"]
    got = [dict(zip(columns, r, strict=True)) for r in rows]
    assert [(r["step"], r["action"]) for r in got] == [
        (6, "skipped, rolled back"), (6, "rolled back"), (9, "rolled back")]  # fmt: skip
    assert got[0]["top_sample"] == "sample 7 (loss 9.5): bad text" and got[1]["top_sample"] == ""
    assert got[0]["grad_norm_from"] == "router 90%" and got[1]["grad_norm_from"] == "-"


SCRIPT = """
import io, json, sys
sys.path.insert(0, {tests!r})
from train_helpers import build
from test_train_spikes_explain import SpikeAt
from kha_train.training import distributed as D

t = SpikeAt(build(json.load(open({cfg!r}))), console=io.StringIO())
t.train()
t.close()
D.teardown()
"""


@pytest.mark.slow
def test_two_ranks_share_the_scoring(spiked_run, tmp_path) -> None:
    """FSDP2 on 2 gloo ranks: each scores half of the batch (a collective), rank 0 logs the
    same samples, losses and texts as one rank."""
    run = tmp_path / "run"
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(config(run, spiked_run["data"])))
    script = tmp_path / "two_ranks.py"
    tests = str(REPO / "tests" / "training")
    script.write_text(textwrap.dedent(SCRIPT.format(tests=tests, cfg=str(cfg_path))))
    proc = run_process(torchrun_cmd(2, str(script)))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def explained(r: Path) -> dict:
        (s,) = [s for s in records(r, "spike") if "top_samples" in s]
        return s

    one, two = explained(spiked_run["run"]), explained(run)
    assert two["step"] == K and two["scored_at_step"] == END
    assert [x["id"] for x in two["top_samples"]] == [x["id"] for x in one["top_samples"]]
    assert [x["text"] for x in two["top_samples"]] == [x["text"] for x in one["top_samples"]]
    assert [x["loss"] for x in two["top_samples"]] == pytest.approx(
        [x["loss"] for x in one["top_samples"]], rel=1e-3
    )
