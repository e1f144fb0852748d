"""`kha-train bench` as tests/test_device_scripts.py fakes it: one JSON line per variant and
precision, built from the arguments, in ``--json``'s file, and the table line the scripts grep.
A row whose micro-batch is FAKE_OOM_MB fails as out of memory."""

import argparse
import json
import os

p = argparse.ArgumentParser()
for flag in (
    "--config",
    "--variants",
    "--precision",
    "--ac",
    "--json",
    "--seq-len",
    "--micro-batch",
    "--accum",
    "--steps",
    "--warmup",
    "--loss-kernel",
    "--fp8-min-dim",
    "--mode",
):
    p.add_argument(flag)
for flag in ("--reshard", "--no-defer-sync", "--no-profile", "--no-sync-check"):
    p.add_argument(flag, action="store_true")
a, _ = p.parse_known_args([x for x in os.sys.argv[1:] if x not in ("-m", "kha_train.cli", "bench")])
mb, accum, seq = int(a.micro_batch), int(a.accum), int(a.seq_len)
settings = {
    "micro_batch": mb,
    "accum": accum,
    "seq_len": seq,
    "ac": a.ac or "none",
    "reshard": a.reshard or None,
    "defer_sync": not a.no_defer_sync,
    "loss_kernel": a.loss_kernel or "chunked",
    "mode": a.mode or "fsdp",
    "fp8": {"recipe": "tensorwise", "min_dim": int(a.fp8_min_dim or 1024)},
}
for precision in (a.precision or "bf16").split(","):
    for variant in (a.variants or "kha").split(","):
        r = {"variant": variant, "precision": precision, "settings": settings}
        if str(mb) == os.environ.get("FAKE_OOM_MB"):
            r["error"] = "OutOfMemoryError: CUDA out of memory."
        else:
            tps = mb * accum * seq / 0.5
            r.update(step_ms=500.0, tokens_per_s=tps, mfu=0.4, peak_mem_gib=60.0, alloc_retries=0)
        with open(a.json, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r))
        print(f"{variant:8} {precision:>4} fake row")
