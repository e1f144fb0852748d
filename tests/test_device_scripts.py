"""The device scripts (scripts/device/*.sh) run end to end on the CPU, with python3 and nvidia-smi
stood in for (tests/device_shims: pip, the bench and the peers faked, perf_table.py real), so
that a shell mistake shows here and not in a call that costs device time."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIMS = Path(__file__).resolve().parent / "device_shims"


def run_script(tmp_path: Path, script: str, *args: str, **env: str) -> tuple[str, list[str], Path]:
    """Run ``scripts/device/<script>`` from the repository root; returns its output, the
    python3 calls it made, and its $OUT."""
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "calls.log"
    full_env = {
        **os.environ, "PATH": f"{SHIMS}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
        "SHIM_LOG": str(log), "REAL_PYTHON": sys.executable, **env,
    }  # fmt: skip
    for name in ("ROWS", "CONFIG", "BENCH_ARGS", "TT", "FAKE_OOM_MB"):
        if name not in env:
            full_env.pop(name, None)
    proc = subprocess.run(
        ["bash", f"scripts/device/{script}", *args], cwd=REPO, env=full_env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.stdout, calls, out


def bench_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if "kha_train.cli bench" in c]


def test_ac_sweep_rows_config_and_a_bad_entry(tmp_path: Path) -> None:
    rows = "sel8:selective:8:1:--reshard,--precision,fp8 bad:full:2 full2:full:2:4"
    text, calls, out = run_script(
        tmp_path, "ac_sweep.sh", "300", ROWS=rows,
        CONFIG="configs/paper/table5/moe_a0.8b_kha_mlp.yaml",
    )  # fmt: skip
    benches = bench_calls(calls)
    assert len(benches) == 2, benches
    assert "--config configs/paper/table5/moe_a0.8b_kha_mlp.yaml --variants kha --ac selective " \
        "--micro-batch 8 --accum 1" in benches[0]  # fmt: skip
    assert benches[0].split(" | ")[0].endswith("--reshard --precision fp8")
    assert "--ac full --micro-batch 2 --accum 4" in benches[1]
    assert "== ROWS entry 'bad:full:2': want NAME:AC:MB:ACCUM[:ARGS]" in text
    table = (out / "table.md").read_text()
    assert "32,768 (8 x 1 x 4096) | fp8, AC selective, loss chunked, reshard_after_forward" in table
    assert "32,768 (2 x 4 x 4096) | bf16, AC full" in table


def test_ac_sweep_skips_rows_when_time_runs_out(tmp_path: Path) -> None:
    text, calls, _ = run_script(tmp_path, "ac_sweep.sh", "50", ROWS="a:full:8:1")
    assert bench_calls(calls) == [] and "== a: skipped" in text


def test_splits_runs_ours_and_torchtitan_at_each_split(tmp_path: Path) -> None:
    _, calls, out = run_script(tmp_path, "splits.sh", "500", "6x5", "30x1", FAKE_OOM_MB="30")
    benches = bench_calls(calls)
    assert [("--micro-batch 6 --accum 5" in benches[0]), ("--micro-batch 30 --accum 1" in
            benches[1])] == [True, True]  # fmt: skip
    peers = [c.split(" | ")[1] for c in calls if "tt_peer.py" in c]
    assert peers == ["MODE=amp MB=6 ACCUM=5", "MODE=amp MB=30 ACCUM=1"]
    table = (out / "table.md").read_text().splitlines()
    assert table[2].startswith("| kha-train, KHA-MLP on V | 122,880 (6 x 5 x 4096)")
    assert table[3].startswith("| torchtitan 0.3.0 | 122,880 (6 x 5 x 4096)")
    assert "failed: OutOfMemoryError" in table[4]  # ours at 30 x 1, reported, the next one runs
    assert table[5].startswith("| torchtitan 0.3.0 | 122,880 (30 x 1 x 4096)")


def test_single_runs_both_modes_beside_torchtitan_and_archives_the_rows(tmp_path: Path) -> None:
    _, calls, out = run_script(tmp_path, "single.sh", "500")
    benches = bench_calls(calls)
    assert [b.split("--mode ")[1].split()[0] for b in benches] == ["single", "fsdp"] * 2
    peers = [c.split(" | ")[1] for c in calls if "tt_peer.py" in c]
    assert peers == ["MODE=bf16 MB=4 ACCUM=1", "MODE=amp MB=6 ACCUM=5"]
    table = (out / "table.md").read_text()
    assert (
        "| 16,384 (4 x 1 x 4096) | bf16, AC none, loss chunked, single device (no FSDP2) |" in table
    )
    assert "| torchtitan 0.3.0 | 122,880 (6 x 5 x 4096) | fp32 params + bf16 autocast" in table
    # Two files come back: the table and one archive of every row's log and JSON.
    assert sorted(p.name for p in out.iterdir()) == ["single.tar.gz", "table.md"]
    with tarfile.open(out / "single.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert "single_mb4x1.jsonl" in names and "tt_amp_mb6x5.log" in names and len(names) == 10


def test_throughput_table_of_ours_and_the_peers(tmp_path: Path) -> None:
    _, calls, out = run_script(tmp_path, "throughput.sh", "500")
    benches = bench_calls(calls)
    assert len(benches) == 2 and "--variants kha,nokha --micro-batch 6 --accum 5" in benches[0]
    table = (out / "table.md").read_text()
    for row in ("| kha-train, no KHA | 122,880 (6 x 5 x 4096)",
                "| torchtitan 0.3.0 | 122,880 (6 x 5 x 4096) | fp32 params + bf16 autocast",
                "| kha-train, KHA-MLP on V | 16,384 (4 x 1 x 4096)",
                "| torchtitan 0.3.0 | 16,384 (4 x 1 x 4096) | bf16 params",
                "| HF transformers | 16,384 (4 x 1 x 4096)"):  # fmt: skip
        assert row in table, (row, table)


def test_perf_runs_bf16_and_fp8_and_the_loss_kernels_in_one_call(tmp_path: Path) -> None:
    text, calls, out = run_script(tmp_path, "perf.sh", "525")
    benches = [c.split(" | ")[0] for c in bench_calls(calls)]
    assert len(benches) == 5, benches
    assert "configs/paper/main/kha.yaml --variants kha --precision bf16,fp8" in benches[0]
    assert "--ac full --micro-batch 2 --accum 4" in benches[0]
    assert "moe_a0.44b_kha_mlp.yaml --variants kha --precision bf16,fp8" in benches[1]
    assert [b.split("--loss-kernel ")[1].split()[0] for b in benches[2:4]] == ["liger", "cce"]
    assert "--precision fp8 --fp8-min-dim 512" in benches[4]
    assert sum("bench_loss.py" in c for c in calls) == 2  # reference and main shapes
    assert (
        "| fp8, AC full, loss chunked, fp8 tensorwise dims >= 512 |"
        in (out / "table.md").read_text()
    )
    assert "== done after" in text
