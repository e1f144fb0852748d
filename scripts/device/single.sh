#!/bin/bash
# One device call (issue 18, targets 1 and 2): parallel.single_device (no FSDP2: flat bf16
# weights and gradients, fp32 master weights, FlatAdamW; `kha-train bench --mode single`)
# beside the FSDP2 path and torchtitan, on the reference A0.44B-2.3B MoE, same card, same call,
# seq 4096, clipping on, most telling first:
#   1. mb 4 x 1: ours single (profiled), ours FSDP2 (profiled), torchtitan bf16 (compiled)
#   2. mb 6 x 5: ours single (profiled), torchtitan amp (fp32 params + autocast), ours FSDP2
# Usage: bash scripts/device/single.sh [DEADLINE_S] [KHA_BENCH_ARGS...]
# Returns table.md and single.tar.gz (every row's log and JSON).
# Carry: .whl (omegaconf, antlr4; torchtitan's wheels in .whl/peers), .peers_src, .kha_commit.
set -u
export PYTHONUNBUFFERED=1
deadline=${1:-560}; shift || true
extra=("$@")
source "$(dirname "$0")/lib.sh"  # left, install_wheels, logged_row
install_wheels .whl /tmp/site
install_wheels .whl/peers /tmp/peers
use_wheels_and_log_commit
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cfg=configs/paper/table5/moe_a0.44b_kha_mlp.yaml
row() {  # row NAME CAP_S COMMAND...
  logged_row "$1" "$2" "^(kha|nokha)[ /]|GPU time/step|^RESULT|OOM|Error" "${@:3}"
}
ours() {  # ours NAME CAP_S MODE MB ACCUM STEPS
  row $1 $2 python3 -m kha_train.cli bench --config $cfg --variants kha --mode $3 \
    --micro-batch $4 --accum $5 --seq-len 4096 --steps $6 --warmup 2 --json $OUT/$1.jsonl \
    "${extra[@]}"
}
tt() {  # tt NAME CAP_S MODE MB ACCUM STEPS
  row $1 $2 env PYTHONPATH=/tmp/peers MODE=$3 MB=$4 ACCUM=$5 CLIP=1 TORCH_COMPILE=1 PROFILE=0 \
    STEPS=$6 WARMUP=2 OOM_RETRY=0 python3 .peers_src/tt_peer.py
}
ours single_mb4x1 120 single 4 1 8
ours fsdp_mb4x1 110 fsdp 4 1 8
tt tt_bf16_mb4x1 90 bf16 4 1 8
ours single_mb6x5 150 single 6 5 3
tt tt_amp_mb6x5 110 amp 6 5 3
ours fsdp_mb6x5 150 fsdp 6 5 3
echo "== done after $(( $(date +%s) - start ))s"
files=(); for f in single_mb4x1.jsonl fsdp_mb4x1.jsonl tt_bf16_mb4x1.log single_mb6x5.jsonl \
  tt_amp_mb6x5.log fsdp_mb6x5.jsonl; do
  [ -f $OUT/$f ] && files+=($OUT/$f)
done
if [ ${#files[@]} -gt 0 ]; then
  python3 scripts/perf_table.py "${files[@]}" | tee $OUT/table.md
fi
# At most 8 files come back from a call: the rows' logs and JSON in one archive.
(cd $OUT && rows=$(ls *.log *.jsonl 2>/dev/null) && [ -n "$rows" ] \
  && tar czf single.tar.gz $rows && rm -f $rows)
