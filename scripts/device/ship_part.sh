#!/bin/bash
# First device call of a session: park the first part of the packed corpus (over 56 MiB: it
# travels alone, carry data/pack/parts.json and data/pack/study.tar.xz.000) outside the tree,
# since a later call's carry replaces data/pack. scripts/device/study.sh then brings the rest.
set -eu
mkdir -p /tmp/pack && cp data/pack/parts.json data/pack/study.tar.xz.000 /tmp/pack/
ls -la /tmp/pack; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print(torch.__version__)"
