"""What is checked about a checkpoint folder before anything in it is unpickled or loaded: its
manifest (files, sizes, hashes), the model shapes it holds, the room a new one needs, and look-alike
files that are not checkpoints. The folder layout is described in checkpoint.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn

from kha_train.config import ConfigError

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
CONFIG_FILE = "config.yaml"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Suffixes of folders that are not (or no longer) checkpoints: a save in progress, one being
# deleted, and the previous copy of a step being replaced.
TMP_SUFFIX, DELETING_SUFFIX, OLD_SUFFIX = ".tmp", ".deleting", ".old"
_HASH_MAX_BYTES = 1 << 20  # files up to this size are hashed into the manifest; shards are sized
# AdamW with fp32 master weights: 4 bytes of weights + 8 of moments per parameter.
CHECKPOINT_BYTES_PER_PARAM = 12


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or one that is damaged, incomplete or changed since
    its save; the message names the folder, the problem and what to do."""


def stray_entries(directory: str | os.PathLike[str]) -> list[str]:
    """Names in ``directory`` that look like a checkpoint but are not a published one (a
    ``step_*`` folder without the marker, a ``step_*`` file, ...): they are never loaded."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        if p.name.endswith((TMP_SUFFIX, DELETING_SUFFIX, OLD_SUFFIX)):
            continue  # our own unpublished folders, cleaned up at start
        looks_like = p.name.startswith("step") or p.suffix in (".pt", ".pth", ".safetensors")
        if looks_like and not (STEP_DIR.match(p.name) and (p / MARKER).is_file()):
            out.append(p.name)
    return out


def write_manifest(folder: Path) -> None:
    """Record every file of ``folder`` (size; SHA-256 for files up to 1 MiB and ``.metadata``)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name in (MARKER, MANIFEST):
            continue
        entry: dict[str, Any] = {"bytes": p.stat().st_size}
        if p.name == ".metadata" or entry["bytes"] <= _HASH_MAX_BYTES:
            entry["sha256"] = _sha256(p)
        files[p.relative_to(folder).as_posix()] = entry
    write_text_durably(folder / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1))


def verify_checkpoint(path: Path) -> list[str]:
    """Check ``path`` against its manifest before anything in it is unpickled. Raises
    :class:`CheckpointError` naming every difference; returns warnings (a checkpoint written
    before manifests existed is loaded unchecked, with a warning)."""
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {MARKER} marker: its save was interrupted)"
        )
    if not (path / MANIFEST).is_file():
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"checkpoint {path} has no .metadata: its shards are missing")
        return [f"{path} has no {MANIFEST} (saved by an older kha-train): loaded unchecked"]
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        assert isinstance(files, dict)
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {MANIFEST} ({e})") from e
    problems = []
    for rel, entry in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != entry["bytes"]:
            problems.append(f"{rel} has {f.stat().st_size} bytes, {entry['bytes']} when saved")
        elif "sha256" in entry and _sha256(f) != entry["sha256"]:
            problems.append(f"{rel} differs from the saved file (SHA-256)")
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and f.name not in (MARKER, MANIFEST) and rel not in files:
            problems.append(f"{rel} was not part of the save")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise CheckpointError(
            f"checkpoint {path} was changed or damaged after its save: " + "; ".join(shown)
            + ". Nothing was loaded from it. Fix: resume from another checkpoint "
            "(checkpoint.resume=auto skips it, or name an older step_XXXXXXX folder), or "
            "restore the folder from a copy"
        )  # fmt: skip
    return []


def check_free_space(directory: Path, num_params: int, keep_last: int) -> str | None:
    """A warning if the disk of ``directory`` cannot hold one more checkpoint of a model with
    ``num_params`` parameters (weights + AdamW state; a save needs room for the new checkpoint
    before the oldest is deleted)."""
    from kha_train.fs import free_bytes

    need = CHECKPOINT_BYTES_PER_PARAM * num_params
    free = free_bytes(directory)
    if free is None or free >= need:
        return None
    return (
        f"warning: {directory} has {free / 2**30:.2f} GiB free, but one checkpoint of this "
        f"model takes about {need / 2**30:.2f} GiB (checkpoint.keep_last={keep_last} keeps "
        f"{keep_last}): the first save will fail. Free space or set checkpoint.dir elsewhere"
    )


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
