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
source "$(dirname "$0")/lib.sh"  # left, install_wheels, logged_row
install_wheels .whl /tmp/site
[ "${TT:-1}" = 1 ] && install_wheels .whl/peers /tmp/peers
use_wheels_and_log_commit
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cfg=${CONFIG:-configs/paper/table5/moe_a0.44b_kha_mlp.yaml}
row() {  # row NAME CAP_S COMMAND...
  logged_row "$1" "$2" "^(kha|nokha)[ /]|^RESULT|failed|OOM" "${@:3}"
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
