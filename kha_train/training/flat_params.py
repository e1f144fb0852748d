"""One process without FSDP2 (``parallel.single_device``): the weights and gradients in flat
buffers, the fp32 master weights beside the bf16 ones the model computes with.

FSDP2 on a one-GPU mesh still casts every fp32 weight into a bf16 gather buffer and "gathers"
it (a copy), copies each bf16 gradient into an fp32 reduce buffer and "reduces" it (a copy), and
leaves AdamW a few hundred fp32 tensors: on the reference model at one micro-batch per step
that is 14.6 ms of copies and 25.8 ms of AdamW in a 184 ms step (docs/performance.md). Here:

    tensor                         dtype   where
    ---------------------------    -----   ------------------------------------------------
    model parameters (``.data``)   bf16    views into ``param``: forward and backward use them
    their ``.grad``                bf16    views into ``grad``, filled after the last backward
    master weights                 fp32    ``master``: what checkpoints hold and AdamW updates
    gradient accumulator           fp32    ``acc``: only with several micro-batches per step

Each buffer is laid out in one parameter order, groups contiguous (the optimizer's weight-decay
groups: :meth:`FlatParams.reorder`), so an optimizer step is one elementwise pass per group
(``flat_adamw.py``), which also writes the bf16 weights: no separate cast.

Precision is FSDP2's mixed precision on one GPU: bf16 parameters, inputs of each block cast to
bf16 (FSDP2's ``cast_forward_inputs``: the RoPE tables), fp32 master weights and optimizer. Its
gradients: with one micro-batch per step each is the bf16 gradient autograd produced, as with
FSDP2; with several, the micro-batches' gradients are summed in fp32 (``acc``, as FSDP2 does)
and the sum rounded to bf16 once, after the last (:meth:`_take_grad`).

Checkpoints: the model's state dict returns the fp32 master weights under the parameters' names
and loading one writes the master weights and the bf16 copies, so checkpoints are those of the
FSDP2 path, both ways.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_map

# Every view starts at a multiple of this many elements (128 bytes of bf16): kernels such as
# torch._grouped_mm need 16-byte-aligned operands, which a parameter of, say, 36 elements
# would break for every view after it. The gaps stay zero in every buffer.
ALIGN = 64


class FlatParams:
    """The flat buffers of ``model``'s trainable parameters (module docstring); rebinds every
    parameter's ``.data`` to its bf16 view and ``.grad`` to its gradient view. Build after the
    weights are initialised: the fp32 values become the master weights."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model, self.dtype = model, dtype
        # Unique parameters (a tied embedding and head is one) in model order.
        self.params: list[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self.acc: torch.Tensor | None = None
        self._index, self._count = 0, 1  # the micro-batch in flight (begin_micro_batch)
        self._taken: set[nn.Parameter] = set()
        self._layout(self.params)
        # (Plain functions: torch marks its hooks with an attribute, which a bound method refuses.)
        model.register_state_dict_post_hook(functools.partial(FlatParams._masters_into, self))
        model.register_load_state_dict_pre_hook(functools.partial(FlatParams._load_masters, self))
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._take_grad)

    def _layout(self, order: list[nn.Parameter]) -> None:
        """Lay the buffers out in ``order``: the fp32 masters from the current weights (the
        initialised fp32 parameters, or the masters of an earlier layout), then the bf16
        weights, then the gradients, each old buffer freed before the next is allocated (peak:
        12 bytes per parameter, as many as the fp32 model and its masters)."""
        offsets, at = {}, 0
        for p in order:
            offsets[p] = (at, at + p.numel())
            at += -(-p.numel() // ALIGN) * ALIGN  # the next view starts aligned
        device = order[0].device if order else torch.device("cpu")
        master = torch.zeros(at, dtype=torch.float32, device=device)
        for p in order:
            old = self.master_of(p) if hasattr(self, "master") else p.data
            start, end = offsets[p]
            master[start:end].copy_(old.reshape(-1))
        old = None  # a view would keep the old master alive
        self.master, self.offsets, self.params = master, offsets, order
        self.grad = self.acc = None  # freed; acc comes back with the first accumulating step
        for p in order:
            p.grad = None
        self.param = torch.zeros(at, dtype=self.dtype, device=device)
        self.param.copy_(self.master)
        for p in order:
            p.data = self.view(self.param, p)  # frees the fp32 parameter or the old bf16 buffer
        self.grad = torch.zeros(at, dtype=self.dtype, device=device)

    def view(self, flat: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        """``p``'s part of a flat buffer, in ``p``'s shape."""
        start, end = self.offsets[p]
        return flat[start:end].view(p.shape)

    def master_of(self, p: nn.Parameter) -> torch.Tensor:
        """``p``'s fp32 master weight (a view: writing it changes the master)."""
        return self.view(self.master, p)

    def reorder(self, groups: Iterable[list[nn.Parameter]]) -> list[tuple[int, int]]:
        """Lay the buffers out group after group (every parameter in exactly one group); returns
        each group's [start, end) in the flat buffers. Copies the weights once."""
        groups = [list(g) for g in groups]
        order = [p for g in groups for p in g]
        if len(order) != len(self.params) or set(order) != set(self.params):
            raise ValueError("the optimizer's groups must hold every trainable parameter once")
        self._layout(order)
        starts = [self.offsets[g[0]][0] for g in groups] + [self.master.numel()]
        return list(itertools.pairwise(starts))  # alignment gaps included: they stay zero

    # Gradients --------------------------------------------------------------------------------
    # Autograd leaves each micro-batch's gradient of a parameter in a tensor of its own (``.grad``
    # is None before the backward, so nothing is added); the hook below, run right after, moves
    # it into the flat buffers and frees it. With one micro-batch per step that is one bf16 copy
    # (4 bytes per parameter; adding into a zeroed buffer would read and write 8).

    def begin_micro_batch(self, index: int, count: int) -> None:
        """Before micro-batch ``index`` of ``count`` of a step (see :meth:`_take_grad`)."""
        self._index, self._count = index, count
        self._taken: set[nn.Parameter] = set()
        if count > 1 and self.acc is None:
            self.acc = torch.empty_like(self.master)

    @torch.no_grad()
    def _take_grad(self, p: nn.Parameter) -> None:
        """Post-accumulate-grad hook of every parameter: one micro-batch per step: grad <- g;
        several: acc <- g (first), acc += g, and after the last grad <- bf16(acc + g). Until
        the last, ``.grad`` is left None (the next backward then allocates afresh); after it
        ``.grad`` is the parameter's view of the gradient buffer."""
        g, first, last = p.grad, self._index == 0, self._index == self._count - 1
        if self._count == 1:
            self.view(self.grad, p).copy_(g)
        elif first:
            self.view(self.acc, p).copy_(g)
        elif not last:
            self.view(self.acc, p).add_(g)
        else:
            torch.add(self.view(self.acc, p), g, out=self.view(self.grad, p))
        self._taken.add(p)
        p.grad = self.view(self.grad, p) if last else None

    @torch.no_grad()
    def end_micro_batch(self) -> None:
        """After each micro-batch's backward: a parameter that got no gradient in it (unused by
        that micro-batch's tokens) has its accumulator zeroed (first) or its gradient taken from
        it (last), so no stale value from an earlier step survives."""
        first, last = self._index == 0, self._index == self._count - 1
        for p in self.params:
            if p in self._taken:
                continue
            if first and self._count > 1:
                self.view(self.acc, p).zero_()
            if last:
                grad = self.view(self.grad, p)
                if self._count > 1:
                    grad.copy_(self.view(self.acc, p))
                else:
                    grad.zero_()
                p.grad = grad

    def zero_grads(self) -> None:
        """After the optimizer step: ``.grad`` back to None (nothing to zero: the next step's
        gradients overwrite the buffers)."""
        for p in self.params:
            p.grad = None

    def sync_params(self) -> None:
        """bf16 weights <- master weights (after the masters were written directly)."""
        self.param.copy_(self.master)

    # state-dict hooks ---------------------------------------------------------------------------

    # (The root's hooks see the state dict's keys, from which the activation-checkpoint wrapper
    # removes its prefix, hence the clean names.)

    def _masters_into(self, module, state_dict, prefix, local_metadata) -> None:
        for name, p in module.named_parameters(remove_duplicate=False):
            key = prefix + _clean(name)
            if p in self.offsets and key in state_dict:
                state_dict[key] = self.master_of(p)

    def _load_masters(self, module, state_dict, prefix, *args) -> None:
        with torch.no_grad():
            for name, p in module.named_parameters(remove_duplicate=False):
                value = state_dict.get(prefix + _clean(name))
                # (A shape mismatch is reported by the load itself.)
                if p in self.offsets and isinstance(value, torch.Tensor) and value.shape == p.shape:
                    self.master_of(p).copy_(value)


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def flat_params_of(model: nn.Module) -> FlatParams | None:
    """The :class:`FlatParams` of a model prepared by :func:`apply_single_device`, else None."""
    return getattr(model, "flat_params", None)


def _to_dtype(dtype: torch.dtype):
    def cast(x: object) -> object:
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tree_map(cast, args), tree_map(cast, kwargs)

    return hook


def cast_block_inputs(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Cast the floating-point inputs of every block to ``dtype`` before its forward, as
    FSDP2's mixed precision does (``cast_forward_inputs``). Before compile: inside its graph."""
    for block in model.layers:
        block.register_forward_pre_hook(_to_dtype(dtype), with_kwargs=True)


def apply_single_device(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> FlatParams:
    """Move ``model``'s initialised weights into :class:`FlatParams` (kept as
    ``model.flat_params``, which ``build_optimizer`` finds)."""
    flat = FlatParams(model, dtype)
    model.flat_params = flat  # type: ignore[assignment]
    return flat
