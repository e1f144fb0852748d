#!/bin/bash
# One device call on one H200 (throughput round 2: FP8 training and the LM-head + loss
# candidates; docs/performance.md, "FP8"). Ends within DEADLINE_S seconds (default 525, under
# the 9 minutes planned for it), every part under `timeout` and the time left:
#   1. loss  scripts/bench_loss.py, reference shapes (6 x 4096 tokens, hidden 1152, vocab
#            151,936): ours (compiled, eager), liger-kernel, cut-cross-entropy   ~1-1.5 min
#   2. main  configs/paper/main/kha.yaml (6.1B / 1.0B active, hidden 2048), bf16 then fp8 in
#            one process: --ac full, micro-batch 2 x accum 4, seq 4096               ~2 min
#   3. ref   configs/paper/table5/moe_a0.44b_kha_mlp.yaml (A0.44B), bf16 then fp8:
#            micro-batch 6 x accum 5, seq 4096                                       ~2 min
#   4. with 100 s left each: the reference step with --loss-kernel liger, then cce  ~1 min each
#   5. with 100 s left: bench_loss.py on the main model's shapes (hidden 2048)      ~1 min
#   6. with 100 s left: the main model in fp8 with k/v too (--fp8-min-dim 512)      ~1 min
# Estimates: a study run's first step (compile included) took 17 s on this H200; a run here
# is its build, one compiling step and 5 steps of 0.8-1.2 s. Each benchmark: 1 warm-up step,
# 3 timed steps, then the no-sync check; no profile (about 30 s a run). Everything printed goes
# to $OUT/perf.log; results also to $OUT/{loss,loss_main}.json, $OUT/{main,ref,main512}.jsonl.
# Usage: bash scripts/device/perf.sh [DEADLINE_S]
# Carry: .whl (omegaconf, antlr4, torchao, liger-kernel, cut-cross-entropy wheels),
#        .kha_commit (the commit, for the log; optional).
set -u
export PYTHONUNBUFFERED=1
deadline=${1:-525}
source "$(dirname "$0")/lib.sh"  # left, install_wheels
log=$OUT/perf.log
# part NAME CAP_S COMMAND...: run it under timeout min(CAP_S, time left - 5 s)
part() {
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) - 5 )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 30 ]; then echo "== $name: skipped, ${t}s left" | tee -a $log; return; fi
  echo "== $name (timeout ${t}s, $(( $(date +%s) - start ))s in): $*" | tee -a $log
  timeout --kill-after=10 $t "$@" 2>&1 | tee -a $log
  echo "== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start ))s" | tee -a $log
}

install_wheels .whl /tmp/site
export PYTHONPATH=/tmp/site:$PWD
{
  echo "commit $(cat .kha_commit 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv,noheader
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -iE "^(torchao|liger|cut.cross|omegaconf|transformers) "
} 2>&1 | tee $log

bench() {  # bench NAME CAP_S CONFIG ARGS...: bf16 then fp8, KHA model only, one process
  local name=$1 cap=$2 config=$3; shift 3
  part $name $cap python3 -m kha_train.cli bench --config $config --variants kha \
    --precision bf16,fp8 --steps 3 --warmup 1 --no-profile --json $OUT/$name.jsonl "$@"
}
part loss 110 python3 scripts/bench_loss.py --shapes ref --out $OUT/loss.json
bench main 250 configs/paper/main/kha.yaml --ac full --micro-batch 2 --accum 4 --seq-len 4096
bench ref 250 configs/paper/table5/moe_a0.44b_kha_mlp.yaml --micro-batch 6 --accum 5 --seq-len 4096
for kernel in liger cce; do  # the fused loss kernels in the whole training step (bf16)
  if [ "$(left)" -ge 100 ]; then
    part ref_$kernel 90 python3 -m kha_train.cli bench \
      --config configs/paper/table5/moe_a0.44b_kha_mlp.yaml --variants kha --precision bf16 \
      --loss-kernel $kernel --steps 3 --warmup 1 --no-profile --json $OUT/ref_$kernel.jsonl \
      --micro-batch 6 --accum 5 --seq-len 4096
  fi
done
if [ "$(left)" -ge 100 ]; then
  part loss_main 90 python3 scripts/bench_loss.py --shapes main --out $OUT/loss_main.json
fi
if [ "$(left)" -ge 100 ]; then
  part main512 120 python3 -m kha_train.cli bench --config configs/paper/main/kha.yaml \
    --variants kha --precision fp8 --fp8-min-dim 512 --steps 3 --warmup 1 --no-profile \
    --json $OUT/main512.jsonl --ac full --micro-batch 2 --accum 4 --seq-len 4096
fi
echo "== done after $(( $(date +%s) - start ))s" | tee -a $log
if ls $OUT/*.jsonl > /dev/null 2>&1; then
  python3 scripts/perf_table.py $OUT/*.jsonl | tee $OUT/table.md
fi
grep -E "^(FP8 speed-up|FP8 numerics|kha +(bf16|fp8)|ref|main |== )" $log
ls -la $OUT
