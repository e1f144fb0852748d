"""scripts/study.py, the replication study runner, end to end on a tiny study: it trains every run
through `kha-train train`, stops for a deadline and resumes, evaluates, analyses and archives
each finished run, skips archived runs, and reports a table and plots from the archives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import REPO, subprocess_env, tiny_config

pytestmark = pytest.mark.slow


def _study(root: Path, dataset: Path) -> Path:
    cfg = tiny_config(root / "unused", dataset, train={"max_steps": 4},
                      checkpoint={"every_steps": 2, "keep_last": 1})  # fmt: skip
    del cfg["logging"]["run_dir"], cfg["model"]["kha"]  # the runner sets them
    (root / "model.yaml").write_text(yaml.safe_dump(cfg))
    study = {"study": "tiny", "config": "model.yaml", "seeds": [1],
             "variants": {"baseline": {}, "kha_mlp_v": {"model.kha.variant": "mlp",
                                                         "model.kha.targets": ["v"]}}}  # fmt: skip
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _study_cmd(command: str, study: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts" / "study.py"), command, str(study), "--runs",
           str(root / "runs"), "--results", str(root / "results"), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_study_runs_resumes_archives_and_reports(tmp_path, tiny_dataset) -> None:
    study = _study(tmp_path, tiny_dataset)
    # A deadline that leaves less than --min-run-s: nothing is started.
    proc = _study_cmd("run", study, tmp_path, "--deadline-s", "30", "--device", "cpu")
    assert proc.returncode == 0 and "stopping" in proc.stdout, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()

    proc = _study_cmd("run", study, tmp_path, "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for run in ("baseline-s1", "kha_mlp_v-s1"):
        archive = tmp_path / "results" / "tiny" / run
        summary = json.loads((archive / "results.json").read_text())
        assert summary["steps"] == 4 and summary["seed"] == 1
        assert summary["final"]["eval_bpb"] > 0 and summary["eval"]["docs"] > 0
        router = summary["analysis"]["router"]
        assert 0 <= router["flip_fraction_mean"] <= 1 and len(router["per_layer"]["bias_std"]) == 2
        assert (archive / "metrics.jsonl.gz").is_file() and (archive / "eval.json").is_file()
    kha = json.loads((tmp_path / "results/tiny/kha_mlp_v-s1/results.json").read_text())
    assert set(kha["analysis"]["kha"]["distance_from_init"]) == {
        f"layers.{i}.attn.kha_v.{w}" for i in (0, 1) for w in ("w_up", "w_gate", "w_down")
    }
    assert (tmp_path / "results/tiny/kha_mlp_v-s1/kha.npz").is_file()

    # Archived runs are not trained again.
    again = _study_cmd("run", study, tmp_path, "--device", "cpu")
    assert again.returncode == 0 and "training" not in again.stdout
    status = _study_cmd("status", study, tmp_path)
    assert status.stdout.count("done (archived)") == 2

    report = _study_cmd("report", study, tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    table = (tmp_path / "results" / "tiny.md").read_text()
    assert "| baseline | 1 |" in table and "| kha_mlp_v | 1 |" in table
    for png in (
        "tiny_loss.png",
        "tiny_bpb.png",
        "tiny_load.png",
        "tiny_kha_kha_mlp_v-s1.png",
        "tiny_kha_drift.png",
    ):
        assert (tmp_path / "results" / png).stat().st_size > 1000
