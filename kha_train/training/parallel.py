"""Parallelism, applied from outside the model: ``parallelize(model, cfg, precision, device)``.

Order (each step needs the previous one's result):

0. precision=fp8: swap the large dense projections for FP8 ones (training/fp8.py), first, so
   that the wrappers, the compiled graphs and FSDP2 all see the converted modules;
1. activation checkpointing (training/activation_checkpoint.py): wrap every block (full), every
   n-th block (every_n), or every block keeping its matrix products (selective), so the block's
   activations are recomputed in backward instead of stored;
2. ``torch.compile`` per block (after the AC wrapper, so the compiled region includes it, and
   before FSDP, so FSDP's hooks stay outside the graphs);
3. FSDP2 ``fully_shard`` on each block, then on the root (embedding, final norm, head).

With ``parallel.single_device`` (one process) step 3 is replaced: each block casts its inputs to
bf16 (as FSDP2 would), and after the weights are initialised ``build_model`` moves them into
flat buffers with fp32 master weights (training/flat_params.py).

Mixed precision (precision=bf16, and fp8 around its FP8 GEMMs): parameters are all-gathered and
computed in bf16, the sharded master weights and the optimizer stay fp32, gradients are
reduce-scattered in fp32.

The mesh is 1-D (``dp_shard``: plain FSDP) or, with ``parallel.dp_replicate > 1``, 2-D
(``dp_replicate`` x ``dp_shard``: HSDP, each replica shards over ``dp_shard`` ranks, e.g. one
node, and gradients are all-reduced across replicas).

``init_weights_like_single_device()`` makes the initial weights independent of the sharding:
see its docstring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.overrides import TorchFunctionMode

from kha_train.config import ACMode, Config, ParallelConfig, Precision
from kha_train.training.activation_checkpoint import apply_activation_checkpointing
from kha_train.training.flat_params import cast_block_inputs
from kha_train.training.fp8 import convert_to_fp8


def build_mesh(cfg: ParallelConfig, device: torch.device) -> DeviceMesh:
    """The data-parallel mesh: (dp_shard,) or (dp_replicate, dp_shard) for HSDP."""
    world = dist.get_world_size()
    replicate = cfg.dp_replicate
    shard = cfg.dp_shard if cfg.dp_shard != -1 else world // replicate
    if replicate * shard != world:
        raise ValueError(
            f"parallel.dp_replicate x dp_shard = {replicate} x {shard} != {world} ranks "
            "(kha_train.config_checks.validate should have caught this)"
        )
    if replicate > 1:
        return init_device_mesh(
            device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )
    return init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place (parameter names stay unchanged)."""
    for block in model.layers:
        block.compile()


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, precision: Precision, reshard_after_forward: bool
) -> None:
    """``fully_shard`` every block, then the root."""
    if precision in (Precision.bf16, Precision.fp8):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by the backward: keep them.
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=mp,
            reshard_after_forward=reshard_after_forward and i < n - 1,
        )
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    precision: Precision,
    device: torch.device,
    mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Apply (FP8 conversion ->) AC -> compile -> FSDP2 to a model built on the meta device
    (see module doc).

    Without a ``mesh`` one is built from ``cfg`` over all ranks; a single process without a
    process group gets a one-rank group first (so benchmarks can call this directly).
    Returns the same module, sharded; call ``to_empty(device=...)`` and initialise next.
    """
    if precision == Precision.fp8:  # first: it checks that this machine runs FP8
        convert_to_fp8(model, cfg.fp8, device)
    if cfg.single_device:
        if precision == Precision.fp32:
            raise ValueError("parallel.single_device needs precision bf16 or fp8")
        apply_activation_checkpointing(model, cfg)
        cast_block_inputs(model)  # before compile: the casts join the blocks' graphs
        if compiles(cfg, device):
            apply_compile(model)
        return model
    if mesh is None:
        if not dist.is_initialized():
            from kha_train.training.distributed import init_distributed

            init_distributed("cuda" if device.type == "cuda" else "cpu")
        mesh = build_mesh(cfg, device)
    apply_activation_checkpointing(model, cfg)
    if compiles(cfg, device):
        apply_compile(model)
    apply_fsdp(model, mesh, precision, reshards_after_forward(cfg))
    return model


def compiles(cfg: ParallelConfig, device: torch.device | str) -> bool:
    """``parallel.compile``, with null resolved: on for CUDA, off elsewhere."""
    if cfg.compile is not None:
        return cfg.compile
    return torch.device(device).type == "cuda"


def settings_line(cfg: Config, device: torch.device | str, world_size: int) -> str:
    """The speed-relevant settings a run resolves to, for the start-of-run line and
    `kha-train info`: compile, loss compile, activation checkpointing, deferred sync, reshard,
    attention backend, precision (with fp8: its recipe and size threshold)."""
    p, on = cfg.parallel, {True: "on", False: "off"}
    auto = {True: " (auto)", False: ""}
    ac = p.activation_checkpointing.value
    ac = f"every_{p.ac_every_n}" if p.activation_checkpointing == ACMode.every_n else ac
    defer, reshard = defers_grad_sync(p, world_size), reshards_after_forward(p, world_size)
    cuda = torch.device(device).type == "cuda"
    sharding = (
        "single device (no FSDP2, flat buffers), "
        if p.single_device
        else f"defer_grad_sync {on[defer]}{auto[p.defer_grad_sync is None]}, "
        f"reshard_after_forward {on[reshard]}{auto[p.reshard_after_forward is None]}, "
    )
    return (
        f"compile {on[compiles(p, device)]}{auto[p.compile is None]}, "
        f"loss compile {on[p.compile_loss and cuda]}, activation checkpointing {ac}, "
        + sharding
        + f"attention {cfg.model.attn_backend.value}, precision {cfg.train.precision.value}"
        + (fp8_settings(p) if cfg.train.precision == Precision.fp8 else "")
    )


def fp8_settings(cfg: ParallelConfig) -> str:
    """' (tensorwise, dims >= 1024, ...)': parallel.fp8 for the settings line."""
    f = cfg.fp8
    extra = (", FP8 all-gather" if f.fsdp_fp8_all_gather else "") + (
        ", emulated" if f.emulate else ""
    )
    return f" ({f.recipe.value}, dims >= {f.min_dim}{extra})"


def _shards_parameters(cfg: ParallelConfig, world: int | None = None) -> bool:
    """Whether each rank holds only a part of the parameters (shard groups of 2+ ranks), with
    ``world`` ranks (default: the process group's)."""
    if world is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
    shard = cfg.dp_shard if cfg.dp_shard != -1 else world // cfg.dp_replicate
    return shard > 1


def defers_grad_sync(cfg: ParallelConfig, world: int | None = None) -> bool:
    """``parallel.defer_grad_sync``, with null resolved: on when each rank's shard group is
    itself alone (nothing is sharded, so keeping everything gathered costs no memory)."""
    if cfg.defer_grad_sync is not None:
        return cfg.defer_grad_sync
    return not _shards_parameters(cfg, world)


def reshards_after_forward(cfg: ParallelConfig, world: int | None = None) -> bool:
    """``parallel.reshard_after_forward``, with null resolved: on when parameters are sharded."""
    if cfg.reshard_after_forward is not None:
        return cfg.reshard_after_forward
    return _shards_parameters(cfg, world)


def set_micro_batch_sync(model: nn.Module, cfg: ParallelConfig, last: bool) -> None:
    """Before each micro-batch's forward: when :func:`defers_grad_sync`, gradients are reduced
    and parameters resharded only after the ``last`` micro-batch of the step (FSDP2 keeps the
    unsharded gradients in its reduce dtype, fp32, in between)."""
    if isinstance(model, FSDPModule) and defers_grad_sync(cfg):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)


# ----------------------------------------------------------------------------------------------
# Initialisation that does not depend on the sharding
# ----------------------------------------------------------------------------------------------

# In-place initialisers whose result does not depend on the tensor's previous value.
_FILLS = {
    torch.Tensor.normal_,
    torch.Tensor.uniform_,
    torch.nn.init.normal_,
    torch.nn.init.uniform_,
}
# Reductions that decide control flow in initialisers (nn.init.trunc_normal_ resamples until
# no value is out of range): answered over the whole tensor, so every rank loops, and draws
# random numbers, exactly as a single device would.
_GLOBAL_REDUCTIONS = {torch.Tensor.any, torch.any, torch.Tensor.all, torch.all}


class _FullTensorFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _FILLS and args and _is_sharded_dtensor(args[0]):
            dt = args[0]
            local = dt.to_local()
            full = torch.empty(dt.shape, dtype=dt.dtype, device=local.device)  # global shape
            func(full, *args[1:], **kwargs)
            with torch.no_grad():
                local.copy_(_local_part(full, dt))
            return dt
        if func in _GLOBAL_REDUCTIONS and args and _is_sharded_dtensor(args[0]):
            return func(args[0].full_tensor(), *args[1:], **kwargs)
        return func(*args, **kwargs)


def _is_sharded_dtensor(x: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _local_part(full: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """The block of ``full`` that this rank holds of the DTensor ``dt``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


@contextlib.contextmanager
def init_weights_like_single_device() -> Iterator[None]:
    """Random initialisers on sharded parameters draw the *full* tensor, then keep this rank's
    part, so the model starts from exactly the weights a single device would draw with the same
    seed, whatever the number of ranks or the mesh.

    (On CPU, DTensor random ops fall back to drawing each shard from the local generator, which
    repeats values across ranks and depends on the world size.) Covers ``normal_``/``uniform_``
    and everything built on them, including ``nn.init.trunc_normal_``'s rejection loop (see
    ``_GLOBAL_REDUCTIONS``); ``tests/training`` checks the tiny models on 2 ranks against a
    plain single-device init. Costs one full-size temporary per parameter, one at a time.
    """
    with _FullTensorFills():
        yield
