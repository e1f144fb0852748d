"""In-place initialisers shared by the modules' ``reset_parameters`` (see Transformer.init_weights).

They work on plain tensors and on the sharded DTensors FSDP2 leaves in place of parameters, so
the trainer can build on the meta device, shard, allocate, and only then initialise.
"""

from __future__ import annotations

import torch
from torch import nn


def trunc_normal_(w: torch.Tensor, std: float) -> None:
    """Normal(0, std) truncated at +-3 std (no rare huge weights at init)."""
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


def fill_identity_(weight: torch.Tensor) -> None:
    """weight <- I, also when ``weight`` is a sharded DTensor."""
    copy_full_(weight, torch.eye(weight.shape[0], weight.shape[1]))


def copy_full_(weight: torch.Tensor, value: torch.Tensor) -> None:
    """weight <- value (a full, unsharded tensor of the weight's global shape), also when
    ``weight`` is a sharded DTensor: the value is then laid out like the weight first."""
    value = value.to(dtype=weight.dtype, device=weight.device)
    if hasattr(weight, "device_mesh"):  # a DTensor
        # Imported here so the model package never imports torch.distributed otherwise.
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, weight.device_mesh, weight.placements)
    with torch.no_grad():
        weight.copy_(value)
