"""scripts/bench_attention.py runs every variant (CPU smoke run: tiny shapes, no timing check)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_attention.py"


def test_bench_attention_smoke_on_cpu() -> None:
    argv = ["--device", "cpu", "--hidden", "64", "--batch", "1", "--seq", "16"]
    argv += ["--talking-seq", "8", "--steps", "1", "--warmup", "0"]
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, check=True
    ).stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for name, cache in [("gqa4", 1024), ("mla", 576), ("gta", 576), ("mqa", 256),
                        ("gqa8_q16", 2048), ("mha16", 4096), ("mea_2cached", 512)]:  # fmt: skip
        assert f"| {cache} |" in rows[name], rows[name]
    assert "| 1.00 |" in rows["gqa4"] and "| 8 |" in rows["talking_heads"]
    assert len([r for r in rows if r not in ("variant", "---")]) == 17
