#!/bin/bash
# One device call (issue 18, target 4: the big configs on one H200): the paper's main model
# (configs/paper/main/kha.yaml, 6.1B total / 1.0B active, 128 experts top-8) in bf16 under each
# activation-checkpointing mode, all at 8 x 4096 tokens per optimizer step, one process per
# row (a failed row, out of memory say, is reported and the next one runs):
#   full mb 2 x 4 (today's 31.9% MFU), selective mb 2 x 4, selective mb 4 x 2, none mb 2 x 4,
#   every_n (2) mb 2 x 4.
# Each row: build, compile, 1 warm-up and 3 timed steps, the profile breakdown (about 1.5 min).
# Usage: bash scripts/device/ac_sweep.sh [DEADLINE_S]
# Carry: .whl (omegaconf, antlr4), .kha_commit (optional).
set -u
export PYTHONUNBUFFERED=1
deadline=${1:-560}; start=$(date +%s)
left() { echo $(( deadline - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
echo "commit $(cat .kha_commit 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
row() {  # row NAME AC MICRO_BATCH ACCUM
  local t=$(( $(left) - 5 )); [ $t -gt 150 ] && t=150
  [ $t -lt 60 ] && { echo "== $1: skipped, $(left) s left"; return; }
  echo "== $1 (--ac $2, micro-batch $3 x accum $4, timeout ${t}s)"
  timeout --kill-after=10 $t python3 -m kha_train.cli bench --config configs/paper/main/kha.yaml \
    --variants kha --ac $2 --micro-batch $3 --accum $4 --seq-len 4096 --steps 3 --warmup 1 \
    --no-sync-check --json $OUT/$1.jsonl 2>&1 | grep -vE '^\{' | tail -3
}
row full_mb2 full 2 4
row selective_mb2 selective 2 4
row selective_mb4 selective 4 2
row none_mb2 none 2 4
row every2_mb2 every_n 2 4
echo "== done after $(( $(date +%s) - start ))s"
ls $OUT/*.jsonl > /dev/null 2>&1 && python3 scripts/perf_table.py $OUT/*.jsonl | tee $OUT/table.md
