"""scripts/bench_loss.py's logic on the CPU: each candidate that imports is checked against ours
before it is timed, and the table and JSON say which passed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_loss_checks_and_times_the_candidates_on_a_tiny_shape(tmp_path) -> None:
    out = tmp_path / "loss.json"
    cmd = [sys.executable, "scripts/bench_loss.py", "--device", "cpu", "--tokens", "128",
           "--hidden", "32", "--vocab", "500", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    by = {r["candidate"]: r for r in report["results"]}
    assert {"ours", "ours-eager"} <= by.keys()
    assert by["ours"]["correct"] and by["ours"]["loss_rel_err"] == 0.0
    assert by["ours-eager"]["correct"] and by["ours"]["ms"] > 0
    # The fused kernels need CUDA and Triton: here they are skipped, each with its reason.
    assert {"liger", "cce"} <= report["skipped"].keys() or {"liger", "cce"} <= by.keys()
