"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), published atomically.

Layout of ``<checkpoint.dir>/step_0000100/``::

    .metadata, __*_*.distcp   DCP: model (parameters + persistent buffers such as the MoE
                              expert biases) and optimizer state, sharded as they live on ranks
    trainer_state.json        step, tokens seen, data-loader position, spike-detector state,
                              non-finite counters (identical on every rank; written by rank 0)
    rng/rank_00000.pt         each rank's torch RNG states (CPU and CUDA)
    config.yaml               the resolved run config
    COMPLETE                  written last: the checkpoint is whole

Publishing: every file is written under ``step_XXXXXXX.tmp/``; once all ranks are done, rank 0
writes ``COMPLETE`` and renames the folder to ``step_XXXXXXX/`` (one atomic rename). A crash or
``kill -9`` mid-save therefore leaves only a ``.tmp`` folder, which nothing ever loads and the
next start deletes; the previous checkpoint is untouched. Older checkpoints beyond
``keep_last`` are deleted only after the new one is published.

Async saves (``checkpoint.async_save``): the state is copied to host memory, then written by a
background thread over a gloo group of its own while training continues; rank 0 publishes when
the write has finished (checked every step without blocking, and before the next save or exit).

Loading reshards: a checkpoint written by N ranks loads on M ranks (DCP plans the reads from the
saved shard layout). A checkpoint of a differently shaped model is refused with the list of
mismatching keys and shapes before anything is read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kha_train.config import ConfigError
from kha_train.training.distributed import DistEnv, gloo_group

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
RNG_DIR = "rng"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of every published checkpoint in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in directory.iterdir():
        m = _STEP_DIR.match(p.name)
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


class CheckpointManager:
    """Saves, publishes, rotates and loads checkpoints (see the module docstring)."""

    def __init__(self, directory: Path, keep_last: int, async_save: bool, env: DistEnv) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self.env = env
        self.group = gloo_group("checkpoint")  # DCP's collectives, also from the writer thread
        self._pending: tuple[int, Path, Path, Future] | None = None
        if env.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("step_*.tmp"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
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
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / RNG_DIR).mkdir(parents=True)
            _write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1))
            _write_text(tmp / CONFIG_FILE, config_yaml)
        dist.barrier(group=self.group)  # the folder exists before anyone writes into it
        torch.save(_rng_state(self.env.device), tmp / RNG_DIR / f"rank_{self.env.rank:05d}.pt")
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
        return final

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
        future.result()  # re-raises a writer error here, on the training thread
        if self.env.is_main:
            self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rank 0: mark ``tmp`` complete, rename it to ``final``, then rotate old checkpoints."""
        _write_text(tmp / MARKER, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        _fsync_dir(tmp)
        if final.exists():
            # Same step saved by an earlier run this one resumed before: replace it, keeping a
            # complete checkpoint under one of the two names at every moment.
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
        self._rotate()

    def _rotate(self) -> None:
        ckpts = complete_checkpoints(self.directory)
        for _, path in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        model_config: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Load model + optimizer (resharding as needed) and this rank's RNG state from ``path``;
        return the trainer state. ``model_config`` (this run's ``model`` section as a dict) makes
        a shape-mismatch error also name the differing settings."""
        check_model_matches(path, model, model_config)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path), process_group=self.group)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        rng_file = path / RNG_DIR / f"rank_{self.env.rank:05d}.pt"
        if rng_file.is_file():  # absent when resuming on more ranks than saved
            _set_rng_state(torch.load(rng_file, weights_only=False), self.env.device)
        return json.loads((path / TRAINER_STATE).read_text())


def checkpoint_model_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The global shape of every ``model.*`` tensor of the checkpoint at ``path`` (prefix
    removed), read from its DCP metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {
        k.removeprefix("model."): tuple(v.size)
        for k, v in meta.items()
        if k.startswith("model.") and isinstance(v, TensorStorageMetadata)
    }


def shape_mismatches(
    saved: dict[str, tuple[int, ...]],
    ours: dict[str, tuple[int, ...]],
    source: str,
    limit: int = 12,
) -> list[str]:
    """One line per tensor whose shape differs between ``saved`` (read from ``source``) and
    ``ours`` (this model), missing on either side included: at most ``limit`` lines plus a count
    of the rest. Shared by weight files and trainer checkpoints."""
    problems = []
    for k in sorted(set(saved) | set(ours)):
        if k not in saved:
            problems.append(f"{k}: missing from the {source} (this model: {list(ours[k])})")
        elif k not in ours:
            problems.append(f"{k}: in the {source} {list(saved[k])}, not in this model")
        elif saved[k] != ours[k]:
            problems.append(f"{k}: {source} {list(saved[k])}, this model {list(ours[k])}")
    extra = len(problems) - limit
    shown = problems[:limit] + ([f"... and {extra} more"] if extra > 0 else [])
    if any(k.endswith("experts.w_gate_EFD") for k in saved):
        shown.append(
            f"(the {source} is from before kha-train stacked each expert's gate and up weights "
            "into experts.w_gate_up_E2FD [E, 2F, D], gate rows first: concatenate w_gate_EFD "
            "and w_up_EFD along dim 1 to load it)"
        )
    return shown


def check_model_matches(
    path: Path, model: nn.Module, model_config: dict[str, Any] | None = None
) -> None:
    """Raise a ConfigError naming every model key whose presence or shape differs between the
    checkpoint at ``path`` and ``model`` (global shapes: the sharding does not matter)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    saved = checkpoint_model_shapes(path)
    ours = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    shown = shape_mismatches(saved, ours, "checkpoint")
    if not shown:
        return
    diff = _model_config_diff(path, model_config) if model_config is not None else ""
    raise ConfigError(
        f"checkpoint {path} was written by a model of another shape:\n  "
        + "\n  ".join(shown)
        + (f"\nmodel settings that differ (checkpoint vs this run): {diff}" if diff else "")
        + f"\nFix: resume with the model settings of {path / CONFIG_FILE}, or start a fresh run "
        "(checkpoint.resume=none and another logging.run_dir or checkpoint.dir)."
    )


def _model_config_diff(path: Path, current: dict[str, Any]) -> str:
    """'model.hidden_size: 64 vs 128, ...' between the checkpoint's config and this run's."""
    try:
        import yaml  # comes with omegaconf

        saved = yaml.safe_load((path / CONFIG_FILE).read_text()).get("model", {})
    except Exception:  # no yaml module, or no readable config: the key list says enough
        return ""
    diffs = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}")
        elif a != b:
            diffs.append(f"{prefix}: {a} vs {b}")

    walk(saved, current, "model")
    return ", ".join(diffs)


# -- helpers ----------------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
