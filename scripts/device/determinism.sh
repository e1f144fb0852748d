#!/bin/bash
# One device call (issue: deterministic mode on the GPU; docs/training.md, "Deterministic mode"):
#   1. a run of the reference config (A0.44B, KHA-MLP-V, mb 6 x 5 x 4096, compiled) with
#      train.deterministic=true, 30 steps on data/builtin, and its tokens/s;
#   2. a resume: `kha-train replay` restores its checkpoint of step 15 and trains steps 16-30
#      again: bitwise equal to the uninterrupted run?
#   3. `kha-train bench` of the same workload with and without --deterministic, profiled, and
#      scripts/kernel_diff.py: which kernels the mode changes and what each costs;
#   4. with time left, a second deterministic run (bitwise equal to 1.?) and the same 30 steps
#      without the mode (where its losses part from 1.'s).
# (Two straight deterministic runs were already compared on the study model: training.md.)
# Each part runs only if the time left allows it (about 110 s a training run or bench row).
# Usage: bash scripts/device/determinism.sh [DEADLINE_S]
# Carry: data/builtin, .whl (omegaconf, antlr4), .kha_commit (optional).
set -u
export PYTHONUNBUFFERED=1
deadline=${1:-540}; start=$(date +%s)
source "$(dirname "$0")/lib.sh"  # left, install_wheels
install_wheels .whl /tmp/site
use_wheels_and_log_commit
cfg=configs/paper/table5/moe_a0.44b_kha_mlp.yaml
# A checkpoint of this model is 26 GiB and the disk holds 64: only det1 saves mid-run (step 15,
# for the replay; the paper config's rollback needs mid-run saves, so the others turn it off),
# and each run's checkpoints are deleted once they are not needed (the final save, about 30 s,
# always happens).
train30() {  # train30 NAME DETERMINISTIC RESERVE_S [OVERRIDES]: 30 steps, unless RESERVE_S would not be left
  local t=$(( $(left) - $3 )); [ $t -gt 170 ] && t=170
  [ $t -lt 60 ] && { echo "$1: skipped, $(left) s left"; return; }
  timeout --kill-after=10 $t python3 -m kha_train.cli train $cfg data.dataset=data/builtin \
    train.max_steps=30 train.micro_batch_size=6 train.global_batch_tokens=122880 \
    train.deterministic=$2 logging.run_dir=/tmp/$1 ${4:-checkpoint.every_steps=0 train.rollback.enabled=false} \
    logging.wandb=disabled train.val_batches=0 train.val_every=0 \
    logging.log_every=1 > $OUT/$1.log 2>&1
  echo "$1 (deterministic=$2): exit $?"; grep -E "^step +(6|16|30)/" $OUT/$1.log | cut -c1-110
  cp /tmp/$1/metrics.jsonl $OUT/$1.jsonl 2>/dev/null
  [ $1 = det1 ] || rm -rf /tmp/$1/checkpoints
}
train30 det1 true 300 "checkpoint.every_steps=15 checkpoint.keep_last=2"
t=$(( $(left) - 220 )); [ $t -gt 120 ] && t=120
if [ -d /tmp/det1/checkpoints ] && [ $t -ge 60 ]; then  # resume from step 15 = uninterrupted?
  timeout --kill-after=10 $t python3 -m kha_train.cli replay /tmp/det1 --step 16 --after 14 \
    --json $OUT/replay.json > $OUT/replay.log 2>&1
  echo "replay from step 15 (exit $?):"; grep -iE "bitwise|recur|transient" $OUT/replay.log | head -3
fi
rm -rf /tmp/det1/checkpoints
for mode in plain det; do  # the plain row leaves the deterministic one its time
  flag=""; reserve=110; [ $mode = det ] && { flag=--deterministic; reserve=10; }
  t=$(( $(left) - reserve )); [ $t -gt 130 ] && t=130
  [ $t -lt 60 ] && { echo "bench $mode: skipped"; continue; }
  timeout --kill-after=10 $t python3 -m kha_train.cli bench --config $cfg --variants kha \
    --micro-batch 6 --accum 5 --steps 3 --warmup 1 --no-sync-check $flag \
    --json $OUT/bench_$mode.jsonl 2>&1 | grep -vE "^\{" | tail -4
done
[ -f $OUT/bench_det.jsonl ] && python3 scripts/kernel_diff.py $OUT/bench_plain.jsonl $OUT/bench_det.jsonl
train30 det2 true 10
train30 plain false 10
python3 - <<'P'
import json, os, statistics
out = os.environ["OUT"]
def train(name):
    path = f"{out}/{name}.jsonl"
    return [r for r in map(json.loads, open(path)) if r.get("type") == "train"] if os.path.exists(path) else []
d1, d2, p = train("det1"), train("det2"), train("plain")
if d1 and d2:
    same = len(d1) == len(d2) and all(a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] for a, b in zip(d1, d2))
    print(f"deterministic runs bitwise equal over {len(d1)} steps: {same}")
if d1 and d2 and p:
    diff = [a["step"] for a, b in zip(p, d1) if a["loss"] != b["loss"]]
    print("plain vs deterministic: first differing step", diff[:1])
for name, rs in (("det1", d1), ("det2", d2), ("plain", p)):
    if rs:
        print(f"{name}: tokens/s median over steps 11-{len(rs)}: {statistics.median(r['tokens_per_s'] for r in rs[10:]):.0f}")
P

