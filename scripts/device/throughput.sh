#!/bin/bash
# One device call (issue 18, targets 1, 2, 5): kha-train beside torchtitan on the reference
# A0.44B-2.3B MoE, same card, same call, same tokens per optimizer step, clipping on:
#   1. 122,880 tokens per step (mb 6 x accum 5, seq 4096): kha-train KHA-MLP and no KHA (one
#      process, profiled), torchtitan amp (fp32 parameters + bf16 autocast, compiled)
#   2. one micro-batch per step (mb 4 x 1): kha-train KHA-MLP (profiled), torchtitan bf16 (compiled), and
#      with time left Hugging Face transformers' Qwen3MoeForCausalLM (bf16 parameters)
# Every row prints tokens/s, MFU (the same convention on both sides) and peak memory.
# Usage: bash scripts/device/throughput.sh [DEADLINE_S] [KHA_BENCH_ARGS...]
#   KHA_BENCH_ARGS go to every kha-train row (e.g. --loss-kernel liger).
# Carry: .whl (omegaconf, antlr4 at the top; torchtitan and its needs in .whl/peers, see
#        ../shared/peers/README.md), .peers_src (copies of ../shared/peers/tt_peer.py and
#        hf_peer.py, which do not travel by themselves), .kha_commit (optional).
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
  logged_row "$1" "$2" "^(kha|nokha)[ /]|KHA overhead|GPU time/step|^RESULT|^HF |OOM" "${@:3}"
}
row ours_mb6x5 170 python3 -m kha_train.cli bench --config $cfg --variants kha,nokha \
  --micro-batch 6 --accum 5 --seq-len 4096 --steps 4 --warmup 1 --json $OUT/ours_mb6x5.jsonl \
  "${extra[@]}"
row tt_amp_mb6x5 120 env PYTHONPATH=/tmp/peers MODE=amp MB=6 ACCUM=5 CLIP=1 TORCH_COMPILE=1 \
  PROFILE=0 STEPS=4 WARMUP=1 OOM_RETRY=0 python3 .peers_src/tt_peer.py
row ours_mb4x1 120 python3 -m kha_train.cli bench --config $cfg --variants kha \
  --micro-batch 4 --accum 1 --seq-len 4096 --steps 8 --warmup 2 \
  --json $OUT/ours_mb4x1.jsonl "${extra[@]}"  # profiled: where one micro-batch's step goes
row tt_bf16_mb4x1 100 env PYTHONPATH=/tmp/peers MODE=bf16 MB=4 ACCUM=1 CLIP=1 TORCH_COMPILE=1 \
  PROFILE=0 STEPS=8 WARMUP=2 OOM_RETRY=0 python3 .peers_src/tt_peer.py
row hf_mb4x1 90 env MB=4 python3 .peers_src/hf_peer.py  # HF transformers, bf16, no compile
echo "== done after $(( $(date +%s) - start ))s"
files=(); for f in ours_mb6x5.jsonl tt_amp_mb6x5.log ours_mb4x1.jsonl tt_bf16_mb4x1.log hf_mb4x1.log; do
  [ -f $OUT/$f ] && files+=($OUT/$f)
done
if [ ${#files[@]} -gt 0 ]; then
  python3 scripts/perf_table.py "${files[@]}" | tee $OUT/table.md
fi
