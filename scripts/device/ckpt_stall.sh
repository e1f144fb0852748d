#!/bin/bash
# One device call, about 3 minutes (docs/training.md, "Checkpoints and resume", "Async"): what a
# checkpoint save costs the training loop, blocking against async, on the replication study's
# model (123M parameters, a 1.5 GB checkpoint with the optimizer) on data/builtin: 120 steps,
# a save every 20, every step logged. Prints, per run, the median step time and the time the
# steps after each save took beyond it (the save's whole cost to training, however spread).
# Usage: bash scripts/device/ckpt_stall.sh [DEADLINE_S]
# Carry: data/builtin, .whl (omegaconf, antlr4), .kha_commit (optional).
set -u
export PYTHONUNBUFFERED=1
deadline=${1:-240}; start=$(date +%s)
source "$(dirname "$0")/lib.sh"  # left, install_wheels
install_wheels .whl /tmp/site
use_wheels_and_log_commit
cfg=${CKPT_CONFIG:-configs/study/model.yaml}  # another config: a CPU check of this script
for mode in blocking async; do
  t=$(( $(left) - 5 )); [ $t -gt 110 ] && t=110
  [ $t -lt 60 ] && { echo "$mode: skipped, $(left) s left"; continue; }
  async=checkpoint.async_save=true; [ $mode = blocking ] && async=checkpoint.async_save=false
  rm -rf /tmp/stall_$mode
  timeout --kill-after=10 $t python3 -m kha_train.cli train $cfg \
    data.dataset=data/builtin train.max_steps=120 checkpoint.every_steps=20 checkpoint.keep_last=2 \
    $async logging.run_dir=/tmp/stall_$mode logging.log_every=1 \
    logging.wandb=disabled train.val_every=0 train.val_batches=0 "eval.sets={}" \
    > $OUT/stall_$mode.log 2>&1
  echo "$mode: exit $?"
  cp /tmp/stall_$mode/metrics.jsonl $OUT/stall_$mode.jsonl 2>/dev/null
done
python3 - <<'P'
import json, os, statistics
out = os.environ["OUT"]
for mode in ("blocking", "async"):
    path = f"{out}/stall_{mode}.jsonl"
    if not os.path.exists(path):
        continue
    recs = [json.loads(line) for line in open(path)]
    train = {r["step"]: r for r in recs if r.get("type") == "train"}
    saves = sorted(r["step"] for r in recs if r.get("type") == "checkpoint" and r["step"] < 120)
    tokens = {s: train[s]["tokens_seen"] - train.get(s - 1, {"tokens_seen": 0})["tokens_seen"]
              for s in train}
    secs = {s: tokens[s] / train[s]["tokens_per_s"] for s in train if s > 10}
    base = statistics.median(secs.values())
    extra = [sum(secs.get(s + k, base) - base for k in range(1, 20)) for s in saves]
    print(f"{mode}: median step {base * 1e3:.1f} ms; time beyond it in the 19 steps after each "
          f"save (s): {', '.join(f'{e:.2f}' for e in extra)}; median {statistics.median(extra):.2f}")
P
