#!/usr/bin/env bash
# Entrypoint of the kha-train image: make sure the quickstart corpus exists, then run the command.
#
# The image builds data/builtin (tokenizer + token shards of the embedded corpus, about a minute,
# 3 MB) at build time. When a volume hides it (say, one mounted on data/), it is built again here,
# on the first start, into that volume; later starts find it and go straight on. Concurrent starts
# on one shared volume build it once (flock). Environment:
#   KHA_BUILTIN_DATA   where the corpus lives (default data/builtin, as configs/tiny expect)
#   KHA_BUILD_BUILTIN  auto (default): build it when missing, warn and go on if that fails (say, a
#                      read-only volume); 1: the same, but a failure stops the container; 0: never
# A command that starts with an option is handed to torchrun, as the image's old entrypoint did:
#   docker run ... kha-train --nproc_per_node=8 -m kha_train.train CONFIG.yaml
set -euo pipefail

builtin_dir=${KHA_BUILTIN_DATA:-data/builtin}
build_builtin=${KHA_BUILD_BUILTIN:-auto}

# Returns non-zero when the corpus is still missing. Written without relying on `set -e`, which
# does not apply inside a function called from a `||` list.
ensure_corpus() {
    [[ -f $builtin_dir/index.json ]] && return 0
    mkdir -p "$builtin_dir" || return 1
    (
        # One builder at a time; whoever waited finds index.json and skips.
        if command -v flock >/dev/null; then
            flock 9 || exit 1
        fi
        [[ -f $builtin_dir/index.json ]] && exit 0
        echo "kha-train: building the builtin corpus in $builtin_dir (first start, about a minute)" >&2
        kha-train tokenizer train --source builtin --vocab-size 8192 \
            --out "$builtin_dir/tokenizer.json" --no-progress || exit 1
        kha-train data prepare --source builtin --tokenizer "$builtin_dir/tokenizer.json" \
            --out "$builtin_dir" --no-progress
    ) 9>"$builtin_dir/.build.lock"
}

case $build_builtin in
    0) ;;
    1) ensure_corpus ;;
    *) ensure_corpus || echo "kha-train: warning: could not build $builtin_dir; configs/tiny train" \
        "on it (set KHA_BUILD_BUILTIN=0 to skip it when training on your own data)" >&2 ;;
esac

if [[ $# -eq 0 ]]; then
    set -- kha-train train configs/tiny/kha_moe.yaml
elif [[ $1 == -* ]]; then
    set -- torchrun "$@"
fi
exec "$@"
