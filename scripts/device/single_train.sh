#!/bin/bash
# One device call: parallel.single_device through the trainer, what the benchmark cannot show.
#   1. The replication study's model (123M) with single_device and train.deterministic=true:
#      40 steps on data/builtin, a checkpoint every 20 (the flat buffers saved by DCP from the
#      GPU), then `kha-train replay` restores step 20 and trains 21-40 again: bitwise equal?
#   2. The paper's main model at its seq 8192 (micro-batch 4, one per step, selective AC),
#      single_device, 12 steps: does it fit, its tokens/s, its allocator retries.
#   3. With time left, the reference A0.44B at one micro-batch per step (4 x 4096), 30 steps,
#      single_device then FSDP2: the trainer's tokens/s beside the benchmark's.
# Each run's metrics come back as JSON lines; a summary is printed at the end.
# Usage: bash scripts/device/single_train.sh [DEADLINE_S]
#   SMALL_CONFIG, REF_CONFIG, MAIN_CONFIG replace the models and SMALL_ARGS, REF_ARGS, MAIN_ARGS
#   add overrides after the script's (tests/training/test_single_device.py runs it on the CPU
#   with a tiny model); SMALL_STEPS (default 40) sets part 1's length, DATA (default
#   data/builtin) the dataset, WORK (default /tmp) where the runs go.
# Carry: data/builtin, .whl (omegaconf, antlr4), .kha_commit (optional).
set -u
export PYTHONUNBUFFERED=1
deadline=${1:-560}
source "$(dirname "$0")/lib.sh"  # left, install_wheels
install_wheels .whl /tmp/site
use_wheels_and_log_commit
work=${WORK:-/tmp}; data=${DATA:-data/builtin}
common="data.dataset=$data logging.wandb=disabled logging.log_every=1 train.val_every=0
  train.val_batches=0 eval.sets={} train.rollback.enabled=false"
run() {  # run NAME CAP_S RESERVE_S CONFIG OVERRIDES...: train unless RESERVE_S would not be left
  local name=$1 cap=$2 reserve=$3 cfg=$4; shift 4
  local t=$(( $(left) - reserve )); [ $t -gt $cap ] && t=$cap
  [ $t -lt 45 ] && { echo "== $name: skipped, $(left) s left"; return; }
  rm -rf $work/$name
  echo "== $name (timeout ${t}s)"
  timeout --kill-after=10 $t python3 -m kha_train.cli train $cfg $common \
    logging.run_dir=$work/$name "$@" > $OUT/$name.log 2>&1
  echo "== $name: exit $?"
  grep -E "error|Error" $OUT/$name.log | head -3 | cut -c1-300
  cp $work/$name/metrics.jsonl $OUT/$name.jsonl 2>/dev/null
}
steps=${SMALL_STEPS:-40}; half=$(( steps / 2 ))
run small_det 100 420 ${SMALL_CONFIG:-configs/study/model.yaml} parallel.single_device=true \
  train.deterministic=true train.max_steps=$steps checkpoint.every_steps=$half \
  checkpoint.keep_last=2 ${SMALL_ARGS:-}
t=$(( $(left) - 340 )); [ $t -gt 80 ] && t=80
if [ -d $work/small_det/checkpoints ] && [ $t -ge 45 ]; then
  timeout --kill-after=10 $t python3 -m kha_train.cli replay $work/small_det --step $(( half + 1 )) \
    --after $(( steps - half - 1 )) --json $OUT/replay.json > $OUT/replay.log 2>&1
  echo "== replay from step $half: exit $?"
  grep -iE "bitwise|recur|transient" $OUT/replay.log | head -3
fi
rm -rf $work/small_det/checkpoints $work/small_det/replay
run main_single 200 130 ${MAIN_CONFIG:-configs/paper/main/kha.yaml} parallel.single_device=true \
  parallel.activation_checkpointing=selective data.seq_len=8192 train.micro_batch_size=4 \
  train.global_batch_tokens=32768 train.max_steps=12 checkpoint.every_steps=0 ${MAIN_ARGS:-}
ref=${REF_CONFIG:-configs/paper/table5/moe_a0.44b_kha_mlp.yaml}
one_step="train.micro_batch_size=4 train.global_batch_tokens=16384 train.max_steps=30
  checkpoint.every_steps=0"
run ref_single 120 65 $ref parallel.single_device=true $one_step ${REF_ARGS:-}
run ref_fsdp 120 5 $ref parallel.single_device=false $one_step ${REF_ARGS:-}
echo "== done after $(( $(date +%s) - start ))s"
python3 - <<'P'
import json, os, statistics
out = os.environ["OUT"]
for name in ("small_det", "ref_single", "ref_fsdp", "main_single"):
    path = f"{out}/{name}.jsonl"
    if not os.path.exists(path):
        continue
    recs = [json.loads(line) for line in open(path)]
    train = [r for r in recs if r.get("type") == "train"]
    end = [r.get("status") for r in recs if r.get("type") == "end"]
    if not train:
        print(f"{name}: no step logged; end {end}")
        continue
    later = train[len(train) // 3:] or train  # past compilation
    tps = statistics.median(r["tokens_per_s"] for r in later)
    retries = sum(r.get("alloc_retries") or 0 for r in train)
    peak = max(r.get("mem_peak_alloc_gib") or 0 for r in train)
    print(f"{name}: {len(train)} steps, loss {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}, "
          f"tokens/s median over steps {later[0]['step']}-{train[-1]['step']}: {tps:.0f}, "
          f"peak {peak:.1f} GiB, allocator retries {retries}, end {end}")
replay = f"{out}/replay.json"
if os.path.exists(replay):
    print("replay:", json.dumps(json.load(open(replay)))[:400])
P
