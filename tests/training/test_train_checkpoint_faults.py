"""Checkpoints under faults: no code runs from a checkpoint file, a changed or damaged folder is
refused (resume=auto falls back past it), rotation never leaves a half-deleted checkpoint that
looks complete, a failed save (disk full) loses nothing, and one trainer per run directory."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_checkpoint import setup, snapshot, train_step

from kha_train.training import checkpoint as C
from kha_train.training.checkpoint import CheckpointManager, complete_checkpoints
from kha_train.training.checkpoint_checks import (
    MANIFEST,
    MARKER,
    CheckpointError,
    check_free_space,
    stray_entries,
    verify_checkpoint,
    write_manifest,
)
from kha_train.training.runlock import RunLock, RunLockedError


def saved_run(tmp_path: Path, steps: int = 2, keep_last: int = 3):
    """A manager with checkpoints of steps 1..steps, and the state at each."""
    env, model, opt = setup()
    mgr = CheckpointManager(tmp_path, keep_last=keep_last, async_save=False, env=env)
    states = {}
    for step in range(1, steps + 1):
        train_step(model, opt)
        mgr.save(step, model, opt, {"step": step}, "name: x\n")
        states[step] = snapshot(model, opt)
    return mgr, model, opt, states


class _Payload:
    """Unpickling this runs code (what a malicious checkpoint file would do)."""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_rng_state_is_read_without_running_code(tmp_path: Path) -> None:
    mgr, model, opt, _ = saved_run(tmp_path, steps=1)
    ckpt = tmp_path / "step_0000001"
    rng = ckpt / "rng" / "rank_00000.pt"
    assert isinstance(torch.load(rng, weights_only=True)["cpu"], torch.Tensor)  # plain tensors
    payload = _Payload()
    payload.marker = tmp_path / "code_ran"
    with open(rng, "wb") as f:
        pickle.dump({"cpu": payload}, f)
    write_manifest(ckpt)  # even with a matching manifest, the file itself is refused
    with pytest.raises(CheckpointError, match="not a plain tensor file"):
        mgr.load(ckpt, model, opt)
    assert not payload.marker.exists()


@pytest.mark.parametrize("damage", ["shard_size", "metadata", "extra_file", "missing_shard"])
def test_changed_checkpoint_is_refused_and_auto_falls_back(tmp_path: Path, damage: str) -> None:
    mgr, model, opt, states = saved_run(tmp_path, steps=2)
    newest = tmp_path / "step_0000002"
    assert verify_checkpoint(newest) == []
    shard = newest / "__0_0.distcp"
    match damage:
        case "shard_size":
            shard.write_bytes(shard.read_bytes()[:-8])
        case "metadata":
            meta = newest / ".metadata"
            data = bytearray(meta.read_bytes())
            data[-1] ^= 1
            meta.write_bytes(bytes(data))
        case "extra_file":
            (newest / "__1_0.distcp").write_bytes(b"x")
        case "missing_shard":
            shard.unlink()
    with pytest.raises(CheckpointError, match="changed or damaged after its save"):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match="changed or damaged"):
        mgr.restore(str(newest), model, opt)
    train_step(model, opt)  # move on; the fallback must bring back step 1 exactly
    restored = mgr.restore("auto", model, opt)
    assert restored is not None and restored.path.name == "step_0000001"
    assert restored.state == {"step": 1}
    assert any("skipped checkpoint step_0000002" in n for n in restored.notes)
    now = snapshot(model, opt)
    assert all(torch.equal(now[k], states[1][k]) for k in states[1])  # exact: a restore


def test_no_loadable_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    mgr, model, opt, _ = saved_run(tmp_path, steps=1)
    (tmp_path / "step_0000001" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* loads"):
        mgr.restore("auto", model, opt)


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path: Path) -> None:
    mgr, model, opt, _ = saved_run(tmp_path, steps=1)
    (tmp_path / "step_0000001" / MANIFEST).unlink()  # as saved by an older kha-train
    restored = mgr.restore("auto", model, opt)
    assert restored is not None and any("loaded unchecked" in n for n in restored.notes)


def test_rotation_unpublishes_before_deleting(tmp_path: Path, monkeypatch) -> None:
    mgr, model, opt, _ = saved_run(tmp_path, steps=2, keep_last=2)

    rmtree = C.shutil.rmtree

    def crash(path, ignore_errors=False):  # the process dies while deleting an old checkpoint
        if str(path).endswith(".deleting"):
            raise KeyboardInterrupt
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(C.shutil, "rmtree", crash)
    train_step(model, opt)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(3, model, opt, {"step": 3}, "name: x\n")
    monkeypatch.undo()
    # The folder being deleted no longer looks like a checkpoint: only 2 and 3 are published.
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 3]
    assert (tmp_path / "step_0000001.deleting").is_dir()
    CheckpointManager(tmp_path, keep_last=2, async_save=False, env=mgr.env)  # the next start
    assert not (tmp_path / "step_0000001.deleting").exists()


def test_a_replaced_step_survives_a_crash_between_the_renames(tmp_path: Path) -> None:
    mgr, *_ = saved_run(tmp_path, steps=1)
    final = tmp_path / "step_0000001"
    final.rename(tmp_path / "step_0000001.old")  # crash after the first rename
    CheckpointManager(tmp_path, keep_last=2, async_save=False, env=mgr.env)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]
    assert verify_checkpoint(final) == []


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    mgr, model, opt, _ = saved_run(tmp_path, steps=1)

    def full(state, checkpoint_id, process_group=None):
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", f"{checkpoint_id}/__0_0.distcp")

    monkeypatch.setattr(C.dcp, "save", full)
    with pytest.raises(CheckpointError) as e:
        mgr.save(2, model, opt, {"step": 2}, "name: x\n")
    msg = str(e.value)
    assert "No space left on device" in msg and "Fix: free space" in msg
    assert "step_0000002.tmp/__0_0.distcp" in msg and "previous checkpoint" in msg
    assert not (tmp_path / "step_0000002.tmp").exists()  # the partial save is gone
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1]
    assert verify_checkpoint(tmp_path / "step_0000001") == []


def test_free_space_warning_and_look_alike_files(tmp_path: Path) -> None:
    assert check_free_space(tmp_path, num_params=1000, keep_last=2) is None
    warning = check_free_space(tmp_path, num_params=10**15, keep_last=2)
    assert warning is not None and "the first save will fail" in warning
    (tmp_path / "step_0000005").mkdir()  # no marker
    (tmp_path / "step_final.pt").write_bytes(b"")
    (tmp_path / "step_0000006.tmp").mkdir()  # ours, unpublished: not reported
    good = tmp_path / "step_0000007"
    good.mkdir()
    (good / MARKER).write_text("x")
    (tmp_path / "notes.txt").write_text("")
    assert stray_entries(tmp_path) == ["step_0000005", "step_final.pt"]


def test_one_lock_per_run_directory(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}, started"):
            RunLock(tmp_path)
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    RunLock(tmp_path).release()  # free again


def test_lock_dies_with_a_killed_process(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kha_train.training.runlock import RunLock;"
         f" lock = RunLock({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # the kernel frees the lock with the process
        try:
            RunLock(tmp_path).release()
            break
        except RunLockedError:
            assert time.monotonic() < deadline, "lock still held after kill -9"
            time.sleep(0.1)


def test_run_dir_under_a_regular_file_is_a_clear_error(tmp_path: Path) -> None:
    from kha_train.fs import StorageError

    (tmp_path / "file").write_text("")
    with pytest.raises(
        StorageError, match=r"Not a directory.*Fix: a part of the path is a regular"
    ):
        RunLock(tmp_path / "file" / "run")


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.EROFS, "the filesystem is mounted read-only: choose a writable logging.run_dir"),
        (errno.EACCES, "give your user write access to it, or choose another logging.run_dir"),
        (errno.ENOSPC, "free space on that disk"),
    ],
)
def test_read_only_or_forbidden_run_directory_is_one_error_with_the_fix(
    tmp_path: Path, monkeypatch, code: int, fix: str
) -> None:
    # As root no permission stops a write, so the OS error is injected where the lock opens its
    # file: the first thing a trainer writes in its run directory.
    from kha_train.fs import StorageError
    from kha_train.training import runlock

    def refuse(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(runlock.os, "open", refuse)
    with pytest.raises(StorageError) as e:
        RunLock(tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith(f"could not use the run directory {tmp_path / 'run' / '.lock'}: ")
    assert os.strerror(code) in msg and f"Fix: {fix}" in msg
