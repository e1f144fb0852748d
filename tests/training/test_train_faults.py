"""The trainer under faults, end to end: a second trainer on a live run directory (one process
and a 2-rank torchrun job), a checkpoint damaged after its save, a disk that fills up during a
save, a run directory that cannot exist, and the warnings a user should not miss."""

from __future__ import annotations

import io
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_distributed import wait_for_step
from train_helpers import (
    REPO,
    build,
    losses,
    records,
    subprocess_env,
    tiny_config,
    torchrun_cmd,
    write_config,
)

from kha_train.training import distributed as D
from kha_train.training.checkpoint import complete_checkpoints
from kha_train.training.checkpoint_checks import verify_checkpoint
from kha_train.training.runlock import RunLock, RunLockedError
from kha_train.training.trainer import Trainer


def run_here(cfg: dict) -> tuple[Trainer, str]:
    """Train in this process; returns the trainer and what it printed."""
    out = io.StringIO()
    trainer = Trainer(build(cfg), console=out)
    try:
        trainer.train()
    finally:
        trainer.close()
        D.teardown()
    return trainer, out.getvalue()


def cli(config: Path, *overrides: str, limit_file_bytes: int | None = None):
    """`kha-train train` in a fresh process (optionally under a file-size limit: writes past it
    fail with EFBIG, which is how a full disk looks to the trainer)."""

    def limit() -> None:
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "kha_train.cli", "train", str(config), *overrides],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240,
        preexec_fn=limit,
    )  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_locked_run_directory_is_refused_before_anything_is_touched(
    tmp_path, tiny_dataset
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 1.0}\n')
    (run / "checkpoints" / "step_0000005.tmp").mkdir(parents=True)  # the holder's save
    with RunLock(run), pytest.raises(RunLockedError, match="in use by another trainer \\(host"):
        Trainer(build(tiny_config(run, tiny_dataset)), console=io.StringIO())
    D.teardown()
    assert (run / "metrics.jsonl").read_text().count("\n") == 1  # not truncated
    assert (run / "checkpoints" / "step_0000005.tmp").is_dir()  # not deleted


@pytest.mark.slow
def test_a_second_torchrun_job_on_a_live_run_directory_is_refused(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, train={"max_steps": 100000}, checkpoint={"every_steps": 0})
    path = write_config(tmp_path / "run.yaml", cfg)
    first = subprocess.Popen(
        [sys.executable, "-m", "kha_train.cli", "train", str(path)], cwd=REPO,
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_step(run, 2, first)
        second = subprocess.run(
            torchrun_cmd(2, "-m", "kha_train.cli", "train", str(path)), cwd=REPO,
            env=subprocess_env(), capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert first.poll() is None, "the first trainer did not survive the second"
        first.send_signal(signal.SIGTERM)  # then stop the first: it saves and exits 0
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode != 0
    assert f"pid {first.pid}" in second.stderr and "in use by another trainer" in second.stderr
    assert first.returncode == 0, err[-3000:]
    last = max(losses(run))
    assert sorted(losses(run)) == list(range(1, last + 1))  # the first run's log is whole
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [last]


def test_auto_resume_skips_a_damaged_checkpoint_and_says_why(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, train={"max_steps": 4}, checkpoint={"every_steps": 2})
    run_here(cfg)
    shard = run / "checkpoints" / "step_0000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # damaged after the save
    cfg["train"]["max_steps"] = 6
    cfg["checkpoint"]["resume"] = "auto"
    _, out = run_here(cfg)
    assert "warning: skipped checkpoint step_0000004" in out and "__0_0.distcp has" in out
    assert "resumed from" in out and "step_0000002 at step 2" in out
    assert sorted(losses(run)) == list(range(1, 7))


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_a_save_is_one_error_and_loses_nothing(
    tmp_path, tiny_dataset, async_save
) -> None:
    """A save that the disk cuts short, blocking or async (written by the background thread, the
    error seen at the next step), is one error, and the checkpoint before it stays."""
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, train={"max_steps": 3}, checkpoint={"every_steps": 0})
    config = write_config(tmp_path / "run.yaml", cfg)
    assert cli(config).returncode == 0
    before = run / "checkpoints" / "step_0000003"
    shard_bytes = (before / "__0_0.distcp").stat().st_size
    # Resume with a save every 3 steps and every file capped below the size of a shard.
    more = ["train.max_steps=9", "checkpoint.every_steps=3", "checkpoint.resume=auto",
            f"checkpoint.async_save={str(async_save).lower()}"]  # fmt: skip
    r = cli(config, *more, limit_file_bytes=shard_bytes // 2)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert re.search(r"could not write checkpoint .*step_0000006\.tmp: a write was cut short", line)
    assert "Fix:" in line and f"previous checkpoint {before} is intact" in line
    assert [s for s, _ in complete_checkpoints(run / "checkpoints")] == [3]
    assert verify_checkpoint(before) == []
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert cli(config, *more).returncode == 0  # room again


def test_run_directory_under_a_regular_file_is_one_error_line(tmp_path, tiny_dataset) -> None:
    (tmp_path / "file").write_text("")
    cfg = tiny_config(tmp_path / "file" / "run", tiny_dataset)
    r = cli(write_config(tmp_path / "run.yaml", cfg))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = error_lines(r.stderr)
    assert "could not use the run directory" in line and "Not a directory" in line
    assert "Fix: a part of the path is a regular file" in line


def test_start_warnings_look_alikes_vocab_and_validation_off(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000009").mkdir(parents=True)  # no COMPLETE marker
    cfg = tiny_config(
        run, tiny_dataset, model={"vocab_size": 4096},
        train={"max_steps": 2, "val_batches": 0}, checkpoint={"every_steps": 0},
    )  # fmt: skip
    _, out = run_here(cfg)
    assert "warning: " in out and "step_0000009, which look like checkpoints" in out
    assert "model.vocab_size=4096 but the dataset's tokenizer has 512 ids" in out
    assert "Set model.vocab_size=512" in out
    assert "settings: compile off (auto), loss compile off" in out  # CPU: the eager path
    assert records(run, "val") == []  # train.val_batches=0: validation off, and no warning
    assert "no validation" not in out
    first = records(run)[0]
    assert first["step"] == 1  # the first line comes after the first step


def test_a_missing_val_split_is_a_warning(tmp_path, tiny_dataset) -> None:
    # The tiny dataset's val split (~15k tokens) cannot fill one micro-batch of 64 x 512 tokens.
    cfg = tiny_config(tmp_path / "run", tiny_dataset, train={"max_steps": 1}, data={"seq_len": 512})
    cfg["train"].update(micro_batch_size=64, global_batch_tokens=64 * 512)
    _, out = run_here(cfg)
    assert "warning: no validation: the val split of" in out
    assert "set train.val_batches=0 to train without validation" in out
