"""FP8 training of the dense projections (train.precision=fp8), with torchao's float8 training.

``convert_to_fp8(model, cfg)`` swaps the selected ``nn.Linear`` modules for torchao's
``Float8Linear`` (a subclass of it, :func:`fp8_linear_class`): each forward casts the input and
the weight to float8 e4m3 with dynamic scales (one per tensor, or per row with
``parallel.fp8.recipe=rowwise``), runs the GEMM on the FP8 tensor cores and returns bf16; the
backward does the same for both gradient GEMMs (the output gradient in e5m2 with the tensorwise
recipe). Weights stay fp32 masters sharded by FSDP2, gathered in bf16 (or, with
``fsdp_fp8_all_gather``, in FP8), so the state dict is exactly the bf16 model's: same keys,
shapes and dtypes, and checkpoints load across bf16 and fp8.

Which modules (:func:`fp8_module_filter`, tested in tests/training/test_fp8.py): the
``nn.Linear`` modules inside the transformer blocks (``layers.*``: attention projections of
every variant, dense SwiGLU FFNs, shared experts) whose in and out features are both >=
``min_dim`` and multiples of 16. Nothing else of the model is an ``nn.Linear`` but the untied LM
head, which is excluded by that rule: the embedding, norms, router, KHA / MEA / talking-heads
matrices and routed experts are parameters used directly, in bf16 (routed experts as grouped
GEMMs: torchao's FP8 grouped GEMM was slower than bf16 ``torch._grouped_mm`` on our shapes).

A projection whose weight the attention folds a KHA part into (KHA-Linear on q/k/v, KHA-MLP's
W_down on o) calls ``forward_with_weight(x, folded_weight)`` (model/attention.py,
``project_with``): the folded weight is computed in bf16, then cast to FP8 like any weight.
Those projections are never FP8-gathered (the fold needs the bf16 weight).

Order in ``parallelize``: convert -> activation checkpointing -> compile -> FSDP2 (torchao's
FSDP2 recipe: the float8 weight wrapper must exist before ``fully_shard``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref
from typing import Any

import torch
from torch import nn

from kha_train.config import ConfigError, Fp8Config, Fp8Recipe
from kha_train.config_checks import fp8_support_errors
from kha_train.model.attention import Attention
from kha_train.model.kha import qkv_transforms

# Models converted with FSDP float8 all-gather: they need their weight scales precomputed before
# each step's first all-gather (:func:`precompute_fp8_scales`).
_FP8_ALL_GATHER_MODELS: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _torchao_float8() -> Any:
    """``torchao.float8``, imported quietly: torchao logs a warning for each of its C++
    extensions built for another torch version (float8 training uses none of them), and newer
    torch one for an enum torchao registers with pytree."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)
    return float8


@functools.cache
def fp8_linear_class() -> type[nn.Linear]:
    """torchao's ``Float8Linear`` with ``forward_with_weight``: the same FP8 GEMM for a weight
    derived from the module's own (a KHA fold), so the derived weight's gradient flows back to
    the parameters it was computed from."""
    _torchao_float8()
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

    class Fp8Linear(Float8Linear):
        def forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            """x @ weight^T in FP8, ``weight`` [out, in] in high precision (bias-free)."""
            if torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))
            return matmul_with_hp_or_float8_args.apply(
                x, weight.t(), self.linear_mm_config, self.config
            )

    return Fp8Linear


def fp8_module_filter(min_dim: int) -> Any:
    """``(module, fqn) -> bool``: the ``nn.Linear`` modules to convert (module docstring)."""

    def keep(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
            return False
        out_features, in_features = module.weight.shape
        return all(d >= min_dim and d % 16 == 0 for d in (out_features, in_features))

    return keep


def fp8_modules(model: nn.Module, cfg: Fp8Config) -> list[str]:
    """Names of the modules :func:`convert_to_fp8` converts (on any device, meta included)."""
    keep = fp8_module_filter(cfg.min_dim)
    return [name for name, m in model.named_modules() if keep(m, name)]


def folded_projections(model: nn.Module) -> set[str]:
    """Names of the projections whose weight the attention uses with a KHA part folded in (it
    calls them through ``forward_with_weight``): q/k/v with KHA-Linear, o with KHA-MLP on V."""
    out = set()
    for name, m in model.named_modules():
        if not isinstance(m, Attention):
            continue
        for proj, t in zip(("q_proj", "k_proj", "v_proj"), qkv_transforms(m)):
            w = getattr(m, proj).weight
            if t.fold_into_projection(w) is not w:  # the attention's own test (project_with)
                out.add(f"{name}.{proj}")
        if m.kha_v_into_output:
            out.add(f"{name}.o_proj")
    return out


def float8_linear_config(cfg: Fp8Config, *, all_gather: bool) -> Any:
    """torchao's ``Float8LinearConfig`` for ``parallel.fp8`` (its recipe, emulation, and FSDP
    float8 all-gather where ``all_gather``)."""
    float8 = _torchao_float8()
    base = float8.Float8LinearConfig.from_recipe_name(Fp8Recipe(cfg.recipe).value)
    return dataclasses.replace(
        base,
        emulate=cfg.emulate,
        enable_fsdp_float8_all_gather=all_gather and cfg.fsdp_fp8_all_gather,
    )


def convert_to_fp8(model: nn.Module, cfg: Fp8Config, device: torch.device | str) -> list[str]:
    """Swap the selected projections of ``model`` (built on the meta device, not yet wrapped
    or sharded) for FP8 ones; returns their names. Raises :class:`ConfigError` if this machine
    cannot run them (the trainer's config check says the same before anything is built)."""
    errs = fp8_support_errors(torch.device(device).type, cfg.emulate)
    if errs:
        raise ConfigError("; ".join(errs))
    _torchao_float8()
    from torchao.float8.float8_linear_utils import swap_linear_layers

    try:  # a workaround torchao applies on its own conversion path (triton-lang/triton#11111)
        from torchao.float8._inductor_patch import _patch_inductor_min_max_codegen

        _patch_inductor_min_max_codegen()
    except ImportError:
        pass
    cls = fp8_linear_class()
    keep = fp8_module_filter(cfg.min_dim)
    folded = folded_projections(model)
    configs = {f: float8_linear_config(cfg, all_gather=not f) for f in (False, True)}
    fqn_of = {id(m): name for name, m in model.named_modules()}
    converted: list[str] = []

    def from_float(m: nn.Linear) -> nn.Linear:
        converted.append(fqn_of[id(m)])
        return cls.from_float(m, config=configs[fqn_of[id(m)] in folded])

    swap_linear_layers(model, from_float, module_filter_fn=keep)
    if cfg.fsdp_fp8_all_gather and set(converted) - folded:
        _FP8_ALL_GATHER_MODELS.add(model)
    return sorted(converted)


def precompute_fp8_scales(model: nn.Module) -> None:
    """With FSDP float8 all-gather: the FP8 scales of all converted weights in one pass (one
    all-reduce of their maxima), for the next all-gathers; no host sync. A no-op for any other
    model. Call it before a step's first forward, after the weights last changed: the optimizer
    step, and also a checkpoint load or a rollback (torchao keeps the last scales otherwise)."""
    if model in _FP8_ALL_GATHER_MODELS:
        _torchao_float8().precompute_float8_dynamic_scale_for_fsdp(model)
