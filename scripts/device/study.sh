#!/bin/bash
# One device call of the replication study (docs/results.md): install the carried wheels, unpack
# the corpus once (its parts: scripts/device/ship_part.sh, then data/pack/study.tar.xz.001
# carried by the first call of this script), then train / evaluate study runs until the
# deadline; the archives come back as $OUT/results.tgz.
# Usage: bash scripts/device/study.sh DEADLINE_S MIN_RUN_S [REF] [STUDY.yaml ...]
#   REF: first measure the in-loop evaluation's cost on the reference config (evaluation.md).
# Carry: .whl (omegaconf + antlr4 wheels), .kha_commit (the commit, for the archives).
# Environment: ONLY="run ..." trains only those runs (study.py run --only); RETRY_FAILED=1 trains
# runs marked FAILED again (--retry-failed); PROBE_LRS="1e-2 3e-2"
# first trains the study model's baseline PROBE_S seconds (default 110) at each LR, on the full
# schedule, and prints its losses and flagged spikes: where does the baseline start to spike?
# PROBE_ARGS="model.qk_norm=false" adds overrides to the probes (PROBE_TAG=_noqk names them).
set -u
start=$(date +%s)  # DEADLINE_S counts from here: installing and unpacking included
export PYTHONUNBUFFERED=1 KHA_COMMIT=$(cat .kha_commit 2>/dev/null || echo unknown)
deadline=$1; min_run=$2; shift 2
ref=""; [ "${1:-}" = REF ] && { ref=1; shift; }
studies=${*:-configs/study/table2.yaml}
source "$(dirname "$0")/lib.sh"  # install_wheels (and left, unused here)
install_wheels .whl /tmp/site
export PYTHONPATH=/tmp/site:$PWD
if [ ! -f data/study/index.json ]; then
  [ -f data/pack/study.tar.xz.001 ] && cp data/pack/study.tar.xz.001 /tmp/pack/
  python3 scripts/pack_corpus.py unpack /tmp/pack --out data/study || exit 1
fi
if [ -n "$ref" ]; then  # in-loop eval cost on the reference config (docs/evaluation.md)
  timeout 300 python3 -m kha_train.cli train configs/paper/table5/moe_a0.44b_kha_mlp.yaml \
    data.dataset=data/builtin train.max_steps=40 train.micro_batch_size=6 train.global_batch_tokens=122880 \
    eval.sets.gutenberg=data/eval_ref eval.every=20 logging.run_dir=/tmp/ref checkpoint.dir=/tmp/ckpt_ref \
    logging.wandb=disabled train.val_batches=0 train.val_every=0 logging.log_every=5 > $OUT/ref.log 2>&1
  echo "ref exit $?"; grep -E "eval |step +(5|20|40)/" $OUT/ref.log | tail -6; rm -rf /tmp/ckpt_ref
fi
for lr in ${PROBE_LRS:-}; do  # SIGTERM after PROBE_S: the trainer saves and exits 0
  if [ $(( deadline - ($(date +%s) - start) )) -lt $(( ${PROBE_S:-110} + 60 )) ]; then
    echo "probe lr $lr: skipped, too little time left"; continue
  fi
  p=probe_$lr${PROBE_TAG:-}
  rm -rf /tmp/$p  # a probe of an earlier call on this machine would refuse to start
  timeout -s TERM --kill-after=30 ${PROBE_S:-110} python3 -m kha_train.cli train \
    configs/study/model.yaml optim.lr=$lr logging.run_dir=/tmp/$p checkpoint.every_steps=0 \
    train.val_every=0 train.val_batches=0 "eval.sets={}" ${PROBE_ARGS:-} > $OUT/$p.log 2>&1
  cp /tmp/$p/metrics.jsonl $OUT/$p.jsonl 2>/dev/null
  python3 scripts/device/probe_summary.py $OUT/$p.jsonl "$lr ${PROBE_ARGS:-}"
done
mkdir -p /tmp/results && cp -rn docs/results/. /tmp/results/  # archived runs are done: not again
left=$(( deadline - ($(date +%s) - start) )); [ $left -lt 1 ] && left=1
only=""; [ -n "${ONLY:-}" ] && only="--only $ONLY"
[ -n "${RETRY_FAILED:-}" ] && only="$only --retry-failed"  # runs marked FAILED, once more
python3 scripts/study.py run $studies --results /tmp/results $only \
  --deadline-s $left --min-run-s $min_run 2>&1 | tee -a $OUT/study.log | grep -v "^step" | tail -30
python3 scripts/study.py status $studies --results /tmp/results
for r in runs/study/*/*/; do n=$(basename $r); grep -E "^step +[0-9]+/" $r/train.log | tail -2 | sed "s/^/$n: /"; done
(cd /tmp && for f in results/*/*/results.json; do  # the archives docs/results lacks: this
  [ -f "$f" ] && [ ! -f "$OLDPWD/docs/$f" ] && dirname "$f"  # call's, and any that an earlier
done | tar czf $OUT/results.tgz -T -)  # call on this machine was cut off before returning
tar czf $OUT/runs_logs.tgz runs/study/*/*/metrics.jsonl runs/study/*/*/train.log 2>/dev/null; ls -la $OUT
