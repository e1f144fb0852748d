"""Model weights in and out of files, for commands that work on a trained model outside the
trainer (`kha-train virtual-heads`, `kha-train export`). Three sources load:

- a trainer checkpoint folder (``step_XXXXXXX/``, torch.distributed.checkpoint): only the
  ``model.*`` entries are read, on one process, whatever the number of ranks that wrote it;
- a ``.safetensors`` file of the model's state dict;
- a ``.pt`` / ``.pth`` / ``.bin`` torch file holding the state dict (or ``{"model": ...}``).

Every key and shape is checked against the model first, with an error naming the mismatches.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kha_train.training.checkpoint_checks import (
    MARKER,
    checkpoint_model_shapes,
    shape_mismatches,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from kha_train.config import Config, ModelConfig


class WeightsError(ValueError):
    """Weights that do not fit the model or cannot be read; the message names file and fix."""


def load_source_config(
    source: Path, config: str | None, overrides: list[str] | None = None
) -> Config:
    """The run config of a weights ``source``: ``config`` if given, else the ``config.yaml``
    beside a trainer checkpoint folder; its model section is checked."""
    from kha_train.config import ConfigError, load_config
    from kha_train.config_checks import validate_model

    path = Path(config) if config else source / "config.yaml"
    if not source.exists():
        raise ConfigError(
            f"{source}: no such checkpoint folder or weights file (give a step_XXXXXXX folder "
            "inside checkpoint.dir, or a .safetensors / .pt file with --config)"
        )
    if not config and not source.is_dir():
        raise ConfigError(f"{source} is a weights file: give its run config with --config")
    cfg = load_config(path, overrides)
    errs = validate_model(cfg.model)
    if errs:
        raise ConfigError(f"{path}: invalid model config:\n  - " + "\n  - ".join(errs))
    return cfg


def load_model(model_cfg: ModelConfig, source: Path, device: torch.device | str) -> nn.Module:
    """A :class:`Transformer` of ``model_cfg`` on ``device`` holding the weights at ``source``."""
    from kha_train.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device=device)
    model.init_weights()  # the non-persistent buffers; every parameter is then loaded
    load_weights(model, source)
    return model


def load_sharded_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load the model weights of trainer checkpoint ``checkpoint`` into a model sharded by FSDP2
    (every rank calls it; each reads its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if not (checkpoint / ".metadata").is_file():
        raise WeightsError(f"{checkpoint} is not a trainer checkpoint (no .metadata)")
    ours = {k: tuple(v.shape) for k, v in get_model_state_dict(model).items()}
    _check_shapes(checkpoint, checkpoint_model_shapes(checkpoint), ours)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(model, state["model"])


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load the weights at ``path`` (see the module docstring) into ``model``, in place."""
    path = Path(path)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise WeightsError(
                f"{path} is a folder without .metadata, not a trainer checkpoint: point at a "
                "step_XXXXXXX folder inside checkpoint.dir, or at a .safetensors / .pt file"
            )
        if (path / MARKER).is_file():  # a trainer checkpoint: check it before DCP unpickles
            for note in verify_checkpoint(path):
                print(f"warning: {note}", file=sys.stderr)
        _check_shapes(path, checkpoint_model_shapes(path), ours)
        import torch.distributed.checkpoint as dcp

        state = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "no process group: loading in a single process": yes
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])
        return
    if not path.is_file():
        raise WeightsError(f"{path}: no such file or checkpoint folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    elif path.suffix in (".pt", ".pth", ".bin"):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
            sd = sd["model"]
    else:
        raise WeightsError(
            f"{path}: unknown weights format {path.suffix!r}: use a trainer checkpoint folder, "
            "a .safetensors file or a .pt / .pth / .bin torch state dict"
        )
    _check_shapes(path, {k: tuple(v.shape) for k, v in sd.items()}, ours)
    model.load_state_dict(sd)


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s state dict as safetensors, atomically (a temporary file, renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


def _check_shapes(
    path: Path, saved: dict[str, tuple[int, ...]], ours: dict[str, tuple[int, ...]]
) -> None:
    shown = shape_mismatches(saved, ours, f"file {path.name}")
    if shown:
        raise WeightsError(
            f"{path} holds weights of another model:\n  " + "\n  ".join(shown) + "\nFix: "
            "give the config the weights were trained with (--config, or the checkpoint's "
            "config.yaml) and the same model.* overrides"
        )
