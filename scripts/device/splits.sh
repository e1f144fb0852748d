#!/bin/bash
# One device call (issue 18, targets 1 and 2): the same tokens per optimizer step split
# differently into micro-batches, kha-train beside torchtitan (fp32 parameters + bf16 autocast,
# compiled: our precision) at each split. The main model ran fastest with one micro-batch per
# step (docs/performance.md, "The main model on one H200"): does the reference model too, and
# does torchtitan gain as much? Each row: seq 4096, clipping on, 1 warm-up and 3 timed steps.
# Usage: bash scripts/device/splits.sh [DEADLINE_S] [SPLIT ...]
#   SPLIT is MBxACCUM (default: 6x5 15x2 10x3 30x1, 122,880 tokens per step each); a split
#   that runs out of memory is reported and the next one runs.
#   CONFIG (default configs/paper/table5/moe_a0.44b_kha_mlp.yaml) and BENCH_ARGS (e.g.
#   "--ac selective --reshard") set our rows; TT=0 leaves out torchtitan's.
# Carry: .whl (omegaconf, antlr4; torchtitan's wheels in .whl/peers), .peers_src, .kha_commit.
set -u
export PYTHONUNBUFFERED=1
deadline=${1:-560}; shift || true
splits=${*:-6x5 15x2 10x3 30x1}
start=$(date +%s)
left() { echo $(( deadline - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
if [ "${TT:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/peers .whl/peers/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
echo "commit $(cat .kha_commit 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cfg=${CONFIG:-configs/paper/table5/moe_a0.44b_kha_mlp.yaml}
row() {  # row NAME CAP_S COMMAND...
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) - 5 )); [ $t -gt $cap ] && t=$cap
  [ $t -lt 45 ] && { echo "== $name: skipped, $(left) s left"; return; }
  echo "== $name (timeout ${t}s)"
  timeout --kill-after=10 $t "$@" > $OUT/$name.log 2>&1
  echo "== $name: exit $?"
  grep -E "^(kha|nokha) |^RESULT|failed|OOM" $OUT/$name.log | cut -c1-240
}
files=()
for split in $splits; do
  mb=${split%x*}; accum=${split#*x}
  row ours_$split 110 python3 -m kha_train.cli bench --config $cfg --variants kha \
    --micro-batch $mb --accum $accum --seq-len 4096 --steps 3 --warmup 1 --no-profile \
    --json $OUT/ours_$split.jsonl ${BENCH_ARGS:-}
  [ -f $OUT/ours_$split.jsonl ] && files+=($OUT/ours_$split.jsonl)
  if [ "${TT:-1}" = 1 ]; then
    row tt_amp_$split 110 env PYTHONPATH=/tmp/peers MODE=amp MB=$mb ACCUM=$accum CLIP=1 \
      TORCH_COMPILE=1 PROFILE=0 STEPS=3 WARMUP=1 OOM_RETRY=0 python3 .peers_src/tt_peer.py
    [ -f $OUT/tt_amp_$split.log ] && files+=($OUT/tt_amp_$split.log)
  fi
done
echo "== done after $(( $(date +%s) - start ))s"
if [ ${#files[@]} -gt 0 ]; then
  python3 scripts/perf_table.py "${files[@]}" | tee $OUT/table.md
fi
