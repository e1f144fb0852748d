"""AdamW with weight-decay groups.

Grouping rule (``optim.no_decay``, whose default is documented beside the field in
``kha_train/config/optim.py``): a parameter whose name contains any of the listed substrings
gets ``weight_decay=0``; every other parameter gets ``optim.weight_decay``. The default exempts
norms, biases, the token embedding (also the LM head when tied) and the head-mixing matrices
that start at the identity (KHA and the other attention variants' mixers), which decay would
pull towards zero instead of towards their start.

Names are matched after removing the wrapper prefixes that activation checkpointing and
``torch.compile`` insert, so the grouping does not depend on ``parallel.*`` options.

Implementation (``optim.implementation``): ``fused`` is one kernel over all parameters and can
skip a non-finite step on the device without a host sync (see ``step.py``); ``foreach`` is the
multi-tensor fallback. ``auto`` picks fused on CUDA and foreach on CPU. A model prepared for one
process without FSDP2 (``parallel.single_device``) gets ``FlatAdamW`` (``flat_adamw.py``: the
same rule over flat buffers, with fp32 master weights and a device-side skip) whatever this says.

Also the gradient arithmetic the step and ``clipping.py`` share, on the device and correct for
FSDP2's sharded (DTensor) gradients: the global grad norm, each tensor's norm, and scaling the
gradients by one factor (through the fused kernel's ``grad_scale`` where it can) or by one
factor per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from kha_train.config import OptimConfig

# Module-name pieces added by wrappers (activation checkpointing, torch.compile, FSDP1-style).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_param_name(name: str) -> str:
    """The parameter's name as the bare model spells it (wrapper prefixes removed)."""
    for piece in _WRAPPER_PREFIXES:
        name = name.replace(piece, "")
    return name


@dataclass
class ParamGroupSummary:
    name: str
    weight_decay: float
    num_tensors: int
    num_params: int


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups: ``decay`` and ``no_decay`` (empty groups are left out)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = clean_param_name(name)
        (no_decay if any(s in clean for s in cfg.no_decay) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def summarize_groups(optimizer: torch.optim.Optimizer) -> list[ParamGroupSummary]:
    """Per-group tensor and parameter counts (global counts: DTensor shapes are global)."""
    return [
        ParamGroupSummary(
            name=g.get("group", f"group{i}"),
            weight_decay=g["weight_decay"],
            num_tensors=len(g["params"]),
            num_params=sum(p.numel() for p in g["params"]),
        )
        for i, g in enumerate(optimizer.param_groups)
    ]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW over ``model``'s parameters with the decay groups above."""
    from kha_train.training.flat_params import flat_params_of

    flat = flat_params_of(model)
    if flat is not None:
        from kha_train.training.flat_adamw import FlatAdamW

        return FlatAdamW(
            flat, param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps, weight_decay=cfg.weight_decay,
        )  # fmt: skip
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=impl == "fused",
        foreach=impl == "foreach",
    )


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer runs a fused kernel that honours ``found_inf`` and ``grad_scale``
    (torch's fused AdamW, or FlatAdamW)."""
    return bool(optimizer.defaults.get("fused")) or getattr(optimizer, "skips_on_device", False)


def begin_micro_batch(optimizer: torch.optim.Optimizer, index: int, count: int) -> None:
    """Before micro-batch ``index`` of the step's ``count``: FlatAdamW takes each gradient into
    its flat buffers as autograd produces it (``flat_params.py``); nothing for torch's AdamW
    (FSDP2 accumulates)."""
    hook = getattr(optimizer, "begin_micro_batch", None)
    if hook is not None:
        hook(index, count)


def end_micro_batch(optimizer: torch.optim.Optimizer) -> None:
    """After that micro-batch's backward (FlatAdamW: parameters that got no gradient)."""
    hook = getattr(optimizer, "end_micro_batch", None)
    if hook is not None:
        hook()


def global_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all parameters' gradients over every rank, a device scalar (no sync);
    fp32 also for bf16 gradients (FlatAdamW's)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and not isinstance(grads[0], DTensor) and grads[0].dtype != torch.float32:
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
        return torch.linalg.vector_norm(torch.stack(norms))
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # the sum of the shards' squares over ranks
    return norm


def clip_gradients(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    grad_norm: torch.Tensor,
    max_norm: float,
) -> None:
    """Scale this step's gradients by min(1, max_norm / grad_norm) (torch's clip_grad_norm_
    rule), on the device, before ``optimizer.step()``. The fused kernel divides every gradient
    by its ``grad_scale`` input as it reads it, so there clipping costs no extra pass over the
    gradients (0.5% of the reference step); otherwise one foreach pass scales them."""
    if max_norm <= 0:
        return
    if is_fused(optimizer):
        optimizer.grad_scale = torch.clamp((grad_norm + 1e-6) / max_norm, min=1.0)  # type: ignore[attr-defined]
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm, foreach=True)


def clip_gradients_to(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    grad_norm: torch.Tensor,
    max_norm: torch.Tensor,
) -> None:
    """:func:`clip_gradients` to a limit decided on the device (a () fp32 tensor; inf: no
    clipping), as ZClip decides it (``clipping.py``)."""
    if is_fused(optimizer):
        optimizer.grad_scale = torch.clamp((grad_norm + 1e-6) / max_norm, min=1.0)  # type: ignore[attr-defined]
    else:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, grad_norm, foreach=True)  # type: ignore[arg-type]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def tensor_grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each gradient over all its shards: (n,) fp32 on the device, no sync.

    Each rank takes the norms of its local shards (one foreach kernel); the squares of sharded
    DTensors are summed over the mesh dimensions they are sharded on, one all-reduce per
    distinct (mesh, placements) (with FSDP2: one all-reduce of n floats). Replicated dimensions
    (HSDP's replicas) hold the same values and are not summed."""
    local = [_local(g) for g in grads]
    if local and local[0].dtype != torch.float32:  # bf16 (FlatAdamW): fp32 norms
        norms = torch._foreach_norm(local, 2.0, dtype=torch.float32)
    else:
        norms = torch._foreach_norm(local)
    groups: dict[object, list[int]] = {}
    for i, g in enumerate(grads):
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(i)
    out: list[torch.Tensor] = list(norms)
    for key, idx in groups.items():
        if key is None:
            continue
        mesh, placements = key
        if any(p.is_partial() for p in placements):
            raise ValueError(f"per-tensor gradient norms of partial DTensors: {placements}")
        sq = torch.stack([norms[i] for i in idx]).float().square()
        sums = [Partial() if p.is_shard() else Replicate() for p in placements]
        total = DTensor.from_local(sq, mesh, sums, run_check=False).full_tensor().sqrt()
        for j, i in enumerate(idx):  # views, in the original order (no index tensor: no copy)
            out[i] = total[j]
    return torch.stack(out).float()


def scale_gradients_each(grads: list[torch.Tensor], coefs: list[torch.Tensor]) -> None:
    """grads[i] *= coefs[i] (0-dim tensors) in place, on each rank's local shards: one foreach
    pass."""
    torch._foreach_mul_([_local(g) for g in grads], coefs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
