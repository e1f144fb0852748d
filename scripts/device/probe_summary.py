"""Summarise an LR probe's metrics (scripts/device/study.sh, PROBE_LRS): flagged spikes, and
the loss and grad norm every 80 steps. Usage: probe_summary.py METRICS.jsonl LR"""

import json
import sys

path, lr = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        records = [json.loads(line) for line in f]
except FileNotFoundError:
    sys.exit(f"probe lr {lr}: no metrics (see its log)")
train = [r for r in records if r.get("type") == "train"]
spikes = [(r["step"], r["metric"], round(r["z"], 1)) for r in records if r.get("type") == "spike"]
last = train[-1] if train else {}
print(f"probe lr {lr}: to step {last.get('step', 0)}, {len(spikes)} spikes flagged: {spikes[:12]}")
for r in train[::8] + train[-1:]:
    print(f"  step {r['step']:5d} loss {r['loss']:.3f} grad norm {r['grad_norm']:.3f}")
