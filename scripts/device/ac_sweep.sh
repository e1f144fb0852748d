#!/bin/bash
# One device call (issue 18, target 4: the big configs on one H200): the paper's main model
# (configs/paper/main/kha.yaml, 6.1B total / 1.0B active, 128 experts top-8) in bf16 under each
# activation-checkpointing mode, all at 8 x 4096 tokens per optimizer step, one process per
# row (a failed row, out of memory say, is reported and the next one runs), most promising
# first: full mb 2 x 4 (round 1's setting: 31.9% MFU then); then with --reshard (reshard_after_forward: each
# block's gathered bf16 weights freed after its forward, about 11 GiB of this model's 112 GiB
# peak, the room activations need): none mb 1 x 8, none mb 2 x 4, selective mb 2 x 4; then
# selective mb 2 x 4 and every_n (2) mb 2 x 4 without it. The fp32 weights, gradients and
# AdamW moments alone take about 91 GiB of the 139.
# Each row: build, compile, 1 warm-up and 3 timed steps, the profile breakdown (about 1.5 min).
# Usage: bash scripts/device/ac_sweep.sh [DEADLINE_S]
#   ROWS="NAME:AC:MB:ACCUM[:ARG,ARG...] ..." runs those rows instead (e.g.
#   ROWS="full_mb4:full:4:2 sel_nodefer:selective:2:4:--no-defer-sync").
#   CONFIG=configs/paper/table5/moe_a0.8b_kha_mlp.yaml times another model (default: the main).
# Carry: .whl (omegaconf, antlr4), .kha_commit (optional).
set -u
export PYTHONUNBUFFERED=1
deadline=${1:-560}
source "$(dirname "$0")/lib.sh"  # left, install_wheels
install_wheels .whl /tmp/site
use_wheels_and_log_commit
row() {  # row NAME AC MICRO_BATCH ACCUM [BENCH_ARGS...]
  local name=$1 ac=$2 mb=$3 accum=$4; shift 4
  local t=$(( $(left) - 5 )); [ $t -gt 150 ] && t=150
  [ $t -lt 60 ] && { echo "== $name: skipped, $(left) s left"; return; }
  echo "== $name (--ac $ac, micro-batch $mb x accum $accum $*, timeout ${t}s)"
  timeout --kill-after=10 $t python3 -m kha_train.cli bench --config ${CONFIG:-configs/paper/main/kha.yaml} \
    --variants kha --ac $ac --micro-batch $mb --accum $accum --seq-len 4096 --steps 3 --warmup 1 \
    --no-sync-check --json $OUT/$name.jsonl "$@" 2>&1 | grep -vE '^\{' | tail -3
}
if [ -n "${ROWS:-}" ]; then
  for spec in $ROWS; do
    IFS=: read -r name ac mb accum args <<< "$spec"
    if [ -z "$accum" ]; then echo "== ROWS entry '$spec': want NAME:AC:MB:ACCUM[:ARGS]"; continue; fi
    row $name $ac $mb $accum ${args//,/ }
  done
else
  row full_mb2 full 2 4
  row none_mb1_reshard none 1 8 --reshard
  row none_mb2_reshard none 2 4 --reshard
  row selective_mb2_reshard selective 2 4 --reshard
  row selective_mb2 selective 2 4
  row every2_mb2 every_n 2 4
fi
echo "== done after $(( $(date +%s) - start ))s"
if ls $OUT/*.jsonl > /dev/null 2>&1; then
  python3 scripts/perf_table.py $OUT/*.jsonl | tee $OUT/table.md
fi
