"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), published atomically.

Layout of ``<checkpoint.dir>/step_0000100/``::

    .metadata, __*_*.distcp   DCP: model (parameters + persistent buffers such as the MoE
                              expert biases) and optimizer state, sharded as they live on ranks
    trainer_state.json        step, tokens seen, data-loader position, spike-detector state,
                              non-finite counters (identical on every rank; written by rank 0)
    rng/rank_00000.pt         each rank's torch RNG states (CPU and CUDA)
    config.yaml               the resolved run config
    MANIFEST.json             every file above with its size (and a SHA-256 of the small ones,
                              .metadata included), written at publish time
    COMPLETE                  written last: the checkpoint is whole

Publishing: every file is written under ``step_XXXXXXX.tmp/``; once all ranks are done, rank 0
writes ``COMPLETE`` and renames the folder to ``step_XXXXXXX/`` (one atomic rename). A crash or
``kill -9`` mid-save therefore leaves only a ``.tmp`` folder, which nothing ever loads and the
next start deletes; the previous checkpoint is untouched. Older checkpoints beyond
``keep_last`` are deleted only after the new one is published, and un-published first (renamed
to ``step_XXXXXXX.deleting``, which nothing loads), so a crash mid-delete never leaves a folder
that looks complete but is not. A failed save (disk full, permissions) removes its ``.tmp``
folder and raises one error naming the path, the cause and the fix; published checkpoints are
never touched by it.

Loading runs no code from the checkpoint: RNG states are plain tensors read with
``weights_only=True``, the trainer state is JSON, and before DCP reads ``.metadata`` (a pickle)
the folder is checked against its manifest, so a file swapped or damaged after the save is
refused. ``resume=auto`` falls back to the newest checkpoint that passes these checks and loads,
naming each one it skipped and why.

Async saves (``checkpoint.async_save``): the state is copied to host memory, then written by a
background thread over a gloo group of its own while training continues; rank 0 publishes when
the write has finished (checked every step without blocking, and before the next save or exit).

Rollbacks (``rollback.py``): :meth:`CheckpointManager.restore_before` loads the newest checkpoint
saved before a given step (with the same checks and fallback as ``resume=auto``), and
:meth:`CheckpointManager.discard_after` then deletes the newer ones (un-published first), which
hold the abandoned steps.

Loading reshards: a checkpoint written by N ranks loads on M ranks (DCP plans the reads from the
saved shard layout). A checkpoint of a differently shaped model is refused with the list of
mismatching keys and shapes before anything is read.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kha_train.config import ConfigError
from kha_train.fs import FIXES, describe, find_os_error, short_write
from kha_train.training.checkpoint_checks import (
    CONFIG_FILE,
    DELETING_SUFFIX,
    MARKER,
    OLD_SUFFIX,
    STEP_DIR,
    TMP_SUFFIX,
    CheckpointError,
    check_model_matches,
    verify_checkpoint,
    write_manifest,
    write_text_durably,
)
from kha_train.training.distributed import DistEnv, gloo_group

TRAINER_STATE = "trainer_state.json"
RNG_DIR = "rng"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every published checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / MARKER).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    ckpts = complete_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, directory: Path) -> Path | None:
    """``checkpoint.resume``: none -> None; auto -> the newest complete checkpoint in
    ``directory`` (None if there is none); otherwise a checkpoint folder that must be complete."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(directory)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(
            f"checkpoint.resume={resume}: no such checkpoint folder. Use auto (the newest in "
            f"{directory}), none, or a step_XXXXXXX folder"
        )
    if not (path / MARKER).is_file():
        raise ConfigError(
            f"checkpoint.resume={resume} is not a complete checkpoint (no {MARKER} marker: the "
            "save was interrupted). Use an earlier step_XXXXXXX folder or checkpoint.resume=auto"
        )
    return path


# Optimizer group keys that choose the implementation, not the update (see CheckpointManager.load).
_OPTIM_IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")


class CheckpointManager:
    """Saves, publishes, rotates and loads checkpoints (see the module docstring)."""

    def __init__(self, directory: Path, keep_last: int, async_save: bool, env: DistEnv) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self.env = env
        self.group = gloo_group("checkpoint")  # DCP's collectives, also from the writer thread
        self._pending: tuple[int, Path, Path, Future] | None = None
        self._published: list[Path] = []  # rank 0: checkpoints completed since take_published()
        if env.is_main:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CheckpointError(describe(e, "create the checkpoint folder")) from e
            _clean_unpublished(self.directory)
        dist.barrier(group=self.group)

    # -- save ------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        config_yaml: str,
        *,
        blocking: bool = False,
    ) -> Path:
        """Write checkpoint ``step``; returns its final path (published at once unless async)."""
        self.wait()  # one save in flight at a time
        final = self.directory / step_dir_name(step)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        try:
            self._write(step, tmp, final, model, optimizer, trainer_state, config_yaml, blocking)
        except (Exception, CheckpointException) as e:
            raise self._failed_save(tmp, e) from e
        return final

    def _write(
        self,
        step: int,
        tmp: Path,
        final: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        config_yaml: str,
        blocking: bool,
    ) -> None:
        local_error: OSError | None = None
        if self.env.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / RNG_DIR).mkdir(parents=True)
                write_text_durably(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1))
                write_text_durably(tmp / CONFIG_FILE, config_yaml)
            except OSError as e:
                local_error = e
        self._all_ok(local_error)  # the folder exists before anyone writes into it
        try:
            rng = tmp / RNG_DIR / f"rank_{self.env.rank:05d}.pt"
            torch.save(_rng_state(self.env.device), rng)
        except OSError as e:
            local_error = e
        self._all_ok(local_error)  # no rank enters DCP's collectives after a local failure
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.async_save and not blocking:
            if self.env.device.type == "cpu":
                # Host tensors are not copied by every torch version's staging: snapshot them,
                # or the writer thread would see the next steps' updates.
                state = _clone_tree(state)
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group)
            future = getattr(future, "upload_completion", future)  # newer torch: a response
            self._pending = (step, tmp, final, future)
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=self.group)
            # dcp.save returns on rank 0 after every rank's shards are written (its final
            # gather), and the RNG files were written before that: rank 0 can publish.
            if self.env.is_main:
                self._publish(tmp, final)

    def _all_ok(self, error: OSError | None) -> None:
        """Raise on every rank if any rank's local write failed (this rank's error, if any)."""
        failed = torch.tensor([error is not None], dtype=torch.int32)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if error is not None:
            raise error
        if failed.item():
            raise CheckpointError("another rank could not write its part of the checkpoint")

    def _failed_save(self, tmp: Path, e: BaseException) -> CheckpointError:
        """Remove the unpublished ``tmp`` folder (rank 0; if that fails too, its .tmp name keeps
        it unpublished and the next start deletes it) and say what happened."""
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        os_error = find_os_error(e)
        if os_error is not None:
            cause = describe(os_error, "write checkpoint", tmp)
        elif short_write(e):
            cause = (
                f"could not write checkpoint {tmp}: a write was cut short (disk full, quota or a "
                f"file-size limit). Fix: {FIXES[errno.ENOSPC]}"
            )
        else:
            cause = f"could not write checkpoint {tmp}: {_short(e)}"
        previous = latest_checkpoint(self.directory)
        kept = (
            f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
        )
        return CheckpointError(f"{cause} ({kept}; the partial save was removed)")

    def poll(self) -> None:
        """Publish a finished async save (non-blocking; call once per step)."""
        if self._pending is not None and self._pending[3].done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is written and published."""
        if self._pending is None:
            return
        _, tmp, final, future = self._pending
        self._pending = None
        try:
            future.result()  # re-raises a writer error here, on the training thread
            if self.env.is_main:
                self._publish(tmp, final)
        except (Exception, CheckpointException) as e:
            raise self._failed_save(tmp, e) from e

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0: write the manifest, mark ``tmp`` complete, rename it to ``final``, then rotate
        old checkpoints."""
        write_manifest(tmp)
        write_text_durably(tmp / MARKER, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        _fsync_dir(tmp)
        if final.exists():
            # Same step saved by an earlier run this one resumed before: replace it, keeping a
            # complete checkpoint under one of the two names at every moment.
            old = final.with_name(final.name + OLD_SUFFIX)
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
        self._published.append(final)
        self._rotate()

    def take_published(self) -> list[Path]:
        """The checkpoints published (made complete) since the last call, oldest first; rank 0
        only (other ranks never publish)."""
        out, self._published = self._published, []
        return out

    def _rotate(self) -> None:
        ckpts = complete_checkpoints(self.directory)
        for _, path in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            _unpublish_and_delete(path)

    # -- load ------------------------------------------------------------------------------------

    def restore(
        self,
        resume: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any] | None = None,
    ) -> Restored | None:
        """Load the checkpoint ``checkpoint.resume`` names: none -> None; a folder -> that one
        (any problem is an error); auto -> the newest in the directory that passes
        :func:`verify_checkpoint` and loads, older ones tried in turn (each skip is in
        ``Restored.notes``), None if there is none. A checkpoint of another model shape is always
        an error (a config problem, not a damaged file). Every rank takes the same decision."""
        if resume == "none":
            return None
        if resume == "auto":
            candidates = [p for _, p in reversed(complete_checkpoints(self.directory))]
        else:
            candidates = [p for p in [resolve_resume(resume, self.directory)] if p is not None]
        return self._restore_first(candidates, resume != "auto", model, optimizer, model_config)

    def restore_before(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any] | None = None,
    ) -> Restored | None:
        """A rollback (``rollback.py``): load the newest checkpoint saved before optimizer step
        ``step`` that passes :func:`verify_checkpoint` and loads, older ones tried in turn (each
        skip is in ``Restored.notes``); None if there is none. An in-flight async save is
        published first. A collective: every rank takes the same decision."""
        self.wait()
        dist.barrier(group=self.group)  # rank 0 has published before anyone lists
        candidates = [p for s, p in reversed(complete_checkpoints(self.directory)) if s < step]
        return self._restore_first(candidates, False, model, optimizer, model_config)

    def discard_after(self, step: int) -> list[Path]:
        """After a rollback to checkpoint ``step``: un-publish and delete every checkpoint newer
        than it (they hold the abandoned steps; none may be resumed); rank 0 deletes, every rank
        returns the list once it is done."""
        self.wait()
        doomed = [p for s, p in complete_checkpoints(self.directory) if s > step]
        dist.barrier(group=self.group)  # every rank has listed them before any is deleted
        if self.env.is_main:
            for path in doomed:
                _unpublish_and_delete(path)
            _fsync_dir(self.directory)
        self._published = [p for p in self._published if p not in doomed]
        dist.barrier(group=self.group)
        return doomed

    def _restore_first(
        self,
        candidates: list[Path],
        strict: bool,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any] | None,
    ) -> Restored | None:
        """Load the first of ``candidates`` that verifies and loads on every rank (``strict``:
        the only one, any problem an error); None without candidates."""
        notes: list[str] = []
        for path in candidates:
            error: CheckpointError | None = None
            try:
                warnings = verify_checkpoint(path)
                state = self.load(path, model, optimizer, model_config)
            except CheckpointError as e:
                error = e
            failed = torch.tensor([error is not None], dtype=torch.int32)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
            if not failed.item():
                return Restored(path, state, notes + warnings)
            if strict:
                raise error or CheckpointError(f"checkpoint {path} failed to load on another rank")
            notes.append(f"skipped checkpoint {path.name}: {error or 'failed on another rank'}")
        if candidates:
            raise CheckpointError(
                f"no checkpoint in {self.directory} loads:\n  " + "\n  ".join(notes) + "\nFix: "
                "restore one from a copy, or start a fresh run (checkpoint.resume=none with "
                "another logging.run_dir or checkpoint.dir)"
            )
        return None

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Load model + optimizer (resharding as needed) and this rank's RNG state from ``path``;
        return the trainer state. ``model_config`` (this run's ``model`` section as a dict) makes
        a shape-mismatch error also name the differing settings. Call :func:`verify_checkpoint`
        first: DCP unpickles ``.metadata``."""
        check_model_matches(path, model, model_config)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(path), process_group=self.group)
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"checkpoint {path}: its shards do not load ({_short(e)})") from e
        # The groups' settings come back from the file; which kernel runs stays this run's: a
        # checkpoint of torch's foreach AdamW (CPU) or of FlatAdamW must not switch a fused one
        # off, or its device-side skip of non-finite steps (training/step.py).
        impl = [{k: g[k] for k in _OPTIM_IMPL_KEYS if k in g} for g in optimizer.param_groups]
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        for group, keep in zip(optimizer.param_groups, impl):
            group.update(keep)
        rng_file = path / RNG_DIR / f"rank_{self.env.rank:05d}.pt"
        if rng_file.is_file():  # absent when resuming on more ranks than saved
            try:  # plain tensors only: no code runs from a checkpoint file
                rng = torch.load(rng_file, weights_only=True)
            except (Exception, CheckpointException) as e:
                raise CheckpointError(
                    f"{rng_file} is not a plain tensor file and was not loaded ({_short(e)})"
                ) from e
            _set_rng_state(rng, self.env.device)
        try:
            return json.loads((path / TRAINER_STATE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path / TRAINER_STATE} does not read ({_short(e)})") from e


@dataclass
class Restored:
    """What :meth:`CheckpointManager.restore` loaded."""

    path: Path
    state: dict[str, Any]  # the trainer state saved with it
    notes: list[str] = field(default_factory=list)  # skipped checkpoints and warnings, to log


# -- helpers ----------------------------------------------------------------------------------


def _clean_unpublished(directory: Path) -> None:
    """Rank 0 at start: delete what a crash left behind. A ``.old`` folder is the only copy of
    its step if the crash came between the two renames of a same-step replace: restore it."""
    for p in directory.glob(f"step_*{OLD_SUFFIX}"):
        final = p.with_name(p.name.removesuffix(OLD_SUFFIX))
        if not final.exists() and (p / MARKER).is_file():
            p.rename(final)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for pattern in (f"step_*{TMP_SUFFIX}", f"step_*{DELETING_SUFFIX}"):
        for p in directory.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def _unpublish_and_delete(path: Path) -> None:
    """Rename ``path`` out of the checkpoint namespace (durably), then delete it: a crash in
    between leaves a ``.deleting`` folder that nothing loads, never a half-deleted checkpoint."""
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    try:
        path.rename(doomed)
    except OSError:
        return  # cannot rename: leave it whole (still a valid checkpoint)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _short(e: BaseException) -> str:
    """The first line of an exception's message, with its type."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _clone_tree(x: Any) -> Any:
    """A copy of a nested state dict whose tensors (DTensors included) own their memory."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        local = x.to_local().detach().clone()
        return DTensor.from_local(
            local, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride()
        )
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    return x
