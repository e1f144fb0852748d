"""scripts/kernel_diff.py: two bench results' kernels side by side, largest change first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_loader import load_script


def _module():
    return load_script("kernel_diff")


def _bench(path: Path, step_ms: float, kernels: list[tuple[str, float]]) -> Path:
    rows = [{"variant": "kha", "error": "OOM"},  # a failed row first: skipped
            {"variant": "kha", "step_ms": step_ms, "tokens_per_s": 1e6 / step_ms,
             "top_kernels": [[n, ms, 3] for n, ms in kernels]}]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_largest_change_first_and_kernels_of_one_side_only(tmp_path, capsys) -> None:
    kd = _module()
    a = _bench(tmp_path / "a.jsonl", 100.0, [("gemm", 50.0), ("index_add", 2.0), ("gone", 1.0)])
    b = _bench(tmp_path / "b.jsonl", 120.0, [("gemm", 50.5), ("index_add", 12.0), ("new", 3.0)])
    rows = kd.diff(kd.load(a), kd.load(b))
    assert [r[0] for r in rows] == ["index_add", "new", "gone", "gemm"]
    assert rows[1] == ("new", 0.0, 3.0) and rows[2] == ("gone", 1.0, 0.0)
    assert kd.main([str(a), str(b), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "x0.833" in out and "index_add" in out and "gemm" not in out


def test_a_result_without_a_profile_is_refused(tmp_path) -> None:
    kd = _module()
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"variant": "kha", "step_ms": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no profiled result"):
        kd.load(path)
