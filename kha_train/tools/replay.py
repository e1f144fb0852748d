"""`kha-train replay RUN_DIR --step N`: re-run the steps around a loss spike from the checkpoint
before it, and say whether the spike comes back.

The replay restores the newest checkpoint of the run before step N (model, optimizer, data
position, spike statistics, all of the trainer state), trains steps checkpoint+1 .. N+after with
the run's own config (``Trainer.run_steps``: no validation, evaluation or checkpoint) into
``RUN_DIR/replay/step_XXXXXXX``, and compares its records with the run's:

- the spike recurs (the replay's detector flags step N again, or the step's loss is within 1%
  of the original): the data of that step causes it. Look at its samples
  (`kha-train spikes RUN_DIR`) or skip them (``data.skip_ranges``);
- it does not recur: a transient (a hardware fault, a kernel's nondeterminism, a bit flip).

Whether the rest of the replay equals the original bitwise is reported too: with
``train.deterministic=true`` on the same GPU type it must (else something else changed); without
it, GPU runs drift apart within a few steps (docs/training.md, "Deterministic mode").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

RECUR_REL = 0.01  # a replayed spike step within 1% of the original loss counts as recurring


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="the run directory (logging.run_dir) of the spike")
    parser.add_argument("--step", type=int, required=True, help="the spike's optimizer step")
    parser.add_argument(
        "--after", type=int, default=10, help="steps to replay after the spike (default 10)"
    )
    parser.add_argument("--json", metavar="OUT", help="also write the comparison as JSON")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for the replay, e.g. train.device=cpu (changing the model or the "
        "data makes it another experiment, not a replay)",
    )


def run_replay(args: argparse.Namespace) -> int:
    from kha_train.config import ConfigError, load_config
    from kha_train.training import distributed as D
    from kha_train.training.checkpoint import complete_checkpoints
    from kha_train.training.loggers import read_jsonl
    from kha_train.training.trainer import Trainer

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file() or not (run / "metrics.jsonl").is_file():
        raise ConfigError(
            f"{run} is not a kha-train run directory (it needs config.yaml and metrics.jsonl)"
        )
    cfg = load_config(run / "config.yaml")
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run / "checkpoints"
    before = [(s, p) for s, p in complete_checkpoints(ckpt_dir) if s < args.step]
    if not before:
        kept = [s for s, _ in complete_checkpoints(ckpt_dir)]
        raise ConfigError(
            f"no checkpoint of {run} before step {args.step} (complete ones in {ckpt_dir}: "
            f"{kept or 'none'}): a replay starts from one. Keep more (checkpoint.keep_last) or "
            "save more often (checkpoint.every_steps) in the runs you may want to replay"
        )
    start, ckpt = before[-1]
    out = run / "replay" / f"step_{args.step:07d}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"checkpoint.resume={ckpt}", f"checkpoint.dir={out / 'checkpoints'}",
        f"logging.run_dir={out}", "logging.wandb=disabled", "logging.tensorboard=false",
        "checkpoint.export_hf=false", "eval.sets={}", *args.overrides,
    ]  # fmt: skip
    replay_cfg = load_config(run / "config.yaml", overrides, notes=[])
    until = args.step + args.after
    print(f"replaying steps {start + 1}..{until} of {run} from {ckpt}")
    trainer = Trainer(replay_cfg)
    try:
        trainer.run_steps(until)
    finally:
        trainer.close()
        D.teardown()
    report = compare(read_jsonl(run / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl"),
                     args.step, start, until, cfg.train.deterministic)  # fmt: skip
    print_report(report, sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _by_step(records: list[dict[str, Any]], kind: str, lo: int, hi: int) -> dict[int, Any]:
    return {r["step"]: r for r in records if r.get("type") == kind and lo < r["step"] <= hi}


def compare(
    original: list[dict[str, Any]],
    replay: list[dict[str, Any]],
    step: int,
    start: int,
    until: int,
    deterministic: bool,
) -> dict[str, Any]:
    """The replay against the run: logged losses step by step, and the spike at ``step``."""
    spikes = ("spike", "spike_skip")
    was = [r for r in original if r.get("type") in spikes and r["step"] == step]
    now = [r for r in replay if r.get("type") in spikes and r["step"] == step]
    a, b = _by_step(original, "train", start, until), _by_step(replay, "train", start, until)
    rows = [
        {"step": s, "original": a[s]["loss"], "replay": b[s]["loss"],
         "equal": a[s]["loss"] == b[s]["loss"]}
        for s in sorted(a.keys() & b.keys())
    ]  # fmt: skip
    loss_was = next((r.get("loss") for r in was), a.get(step, {}).get("loss"))
    loss_now = next((r.get("loss") for r in now), b.get(step, {}).get("loss"))
    close = (
        loss_was is not None
        and loss_now is not None
        and abs(loss_now - loss_was) <= RECUR_REL * abs(loss_was)
    )
    recurs = bool(now) or close
    if not was:
        verdict = f"step {step} was not a spike in the run's records: nothing to explain"
    elif recurs:
        verdict = (
            f"the spike at step {step} recurs: its data causes it (see `kha-train spikes`; "
            "skip its samples with data.skip_ranges)"
        )
    else:
        verdict = (
            f"the spike at step {step} does not recur: a transient (hardware, a kernel's "
            "nondeterminism), not the data"
        )
    return {
        "step": step, "from_checkpoint": start, "until": until, "verdict": verdict,
        "recurs": recurs if was else None, "spike_original": was, "spike_replay": now,
        "spike_loss": {"original": loss_was, "replay": loss_now}, "losses": rows,
        "bitwise_equal": all(r["equal"] for r in rows) if rows else None,
        "deterministic": deterministic,
    }  # fmt: skip


def print_report(report: dict[str, Any], file: Any) -> None:
    print(f"{'step':>7}  {'original':>10}  {'replay':>10}", file=file)
    for r in report["losses"]:
        mark = "" if r["equal"] else f"  ({r['replay'] - r['original']:+.2e})"
        print(f"{r['step']:>7}  {r['original']:10.5f}  {r['replay']:10.5f}{mark}", file=file)
    loss = report["spike_loss"]
    if loss["original"] is not None and loss["replay"] is not None:
        print(f"spike step {report['step']}: loss {loss['original']:.5f} in the run, "
              f"{loss['replay']:.5f} in the replay", file=file)  # fmt: skip
    if report["bitwise_equal"] is not None:
        same = "bitwise equal" if report["bitwise_equal"] else "not bitwise equal"
        note = "" if report["deterministic"] else " (train.deterministic was off)"
        print(f"logged losses of the replay: {same}{note}", file=file)
    print(report["verdict"], file=file)
