"""AdamW over :class:`~kha_train.training.flat_params.FlatParams` (``parallel.single_device``).

Per weight-decay group, a contiguous slice of the flat buffers, one elementwise pass (compiled
on CUDA: one kernel per chunk; eager elsewhere) computes torch's AdamW rule on the fp32 master
weights and writes the bf16 weights the model computes with::

    g      = grad / grad_scale                  (clipping: the fused kernel's grad_scale input)
    m      = m + (1 - beta1) (g - m)
    v      = beta2 v + (1 - beta2) g^2
    master = master (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    param  = bf16(master)

and leaves all of it (and the step count t) as it was when ``found_inf`` is set: the same
device-side skip as torch's fused AdamW, which the step (``step.py``) relies on. Bytes per
parameter: reads grad (2), master, m, v (12), writes master, m, v (12), param (2).

Its state dict is torch AdamW's (per parameter ``step``, ``exp_avg``, ``exp_avg_sq``; the
groups' hyper-parameters), so a checkpoint of either path resumes on the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from kha_train.training.flat_params import FlatParams

# Elements per pass: bounds the eager version's temporaries (CPU); the compiled kernel makes none,
# and its passes are as long as 32-bit indexing allows (fewer launches, few distinct shapes).
CHUNK_EAGER, CHUNK_COMPILED = 1 << 24, 1 << 30


def _adamw_chunk(
    master: torch.Tensor,
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    coef: torch.Tensor,  # (6,) fp32: decay, step_size, 1/sqrt(bc2), 1/grad_scale, keep, eps
    beta1: float,
    beta2: float,
) -> None:
    decay, step_size, inv_bc2_sqrt, inv_scale, keep, eps = coef.unbind()
    g = grad.float() * inv_scale
    m = exp_avg + (1 - beta1) * (g - exp_avg)
    v = beta2 * exp_avg_sq + (1 - beta2) * g * g
    new = master * decay - step_size * m / (v.sqrt() * inv_bc2_sqrt + eps)
    skip = keep == 0
    exp_avg.copy_(torch.where(skip, exp_avg, m))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v))
    master.copy_(torch.where(skip, master, new))
    param.copy_(master)


_compiled = None
# Pass lengths compiled so far. Each is its own graph (static shapes: 32-bit indexing, the
# fastest kernel); dynamo compiles one function for at most 8, then would run it eagerly over
# passes of 2^30 elements with full-size temporaries. Past this many lengths (a process that
# builds several models), the passes of new lengths run eagerly in small chunks instead.
_COMPILED_LENGTHS: set[int] = set()
MAX_COMPILED_LENGTHS = 6


def forget_compiled_lengths() -> None:
    """After ``torch._dynamo.reset()`` (the benchmark's, between models): nothing is compiled."""
    _COMPILED_LENGTHS.clear()


def _passes(device: torch.device, start: int, end: int) -> Iterator[tuple[int, int, Callable]]:
    """(a, b, update) for each pass over the elements [start, end)."""
    global _compiled
    if device.type == "cuda":
        for a in range(start, end, CHUNK_COMPILED):
            b = min(a + CHUNK_COMPILED, end)
            if b - a in _COMPILED_LENGTHS or len(_COMPILED_LENGTHS) < MAX_COMPILED_LENGTHS:
                _COMPILED_LENGTHS.add(b - a)
                if _compiled is None:
                    _compiled = torch.compile(_adamw_chunk, fullgraph=True, dynamic=False)
                yield a, b, _compiled
            else:
                for c in range(a, b, CHUNK_EAGER):
                    yield c, min(c + CHUNK_EAGER, b), _adamw_chunk
    else:
        for a in range(start, end, CHUNK_EAGER):
            yield a, min(a + CHUNK_EAGER, end), _adamw_chunk


class FlatAdamW(torch.optim.Optimizer):
    """AdamW over a model's :class:`FlatParams` (module docstring). ``groups`` as for
    ``torch.optim.AdamW`` (dicts with ``params`` and ``weight_decay``); the flat buffers are
    laid out group after group here."""

    # The step honours found_inf and grad_scale on the device (optim.is_fused).
    skips_on_device = True

    def __init__(
        self,
        flat: FlatParams,
        groups: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        # torch AdamW's group keys too (amsgrad, maximize, ...): DCP loads a checkpoint only
        # into a state dict of the same keys, so both paths must write all of them.
        defaults = dict(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults)
        defaults.update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.flat = flat
        self.bounds = flat.reorder([g["params"] for g in self.param_groups])
        self.exp_avg = torch.zeros_like(flat.master)
        self.exp_avg_sq = torch.zeros_like(flat.master)
        self.t = torch.zeros((), dtype=torch.float32, device=flat.master.device)  # steps taken
        self.grad_scale: torch.Tensor | None = None  # set by optim.clip_gradients
        self.found_inf: torch.Tensor | None = None  # set by the step: 1.0 skips it
        for g in self.param_groups:  # torch AdamW's per-parameter state, as views
            for p in g["params"]:
                self.state[p] = {
                    "step": self.t,
                    "exp_avg": flat.view(self.exp_avg, p),
                    "exp_avg_sq": flat.view(self.exp_avg_sq, p),
                }

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("FlatAdamW.step takes no closure")
        dev = self.t.device
        keep = (
            torch.ones((), device=dev)
            if self.found_inf is None
            else 1.0 - self.found_inf.to(dev, torch.float32)
        )
        inv_scale = (
            torch.ones((), device=dev)
            if self.grad_scale is None
            else 1.0 / self.grad_scale.to(dev, torch.float32)
        )
        self.t.add_(keep)
        t = torch.clamp(self.t, min=1.0)  # a skipped first step: t stays 0, nothing is written
        f = self.flat
        for g, (start, end) in zip(self.param_groups, self.bounds):
            beta1, beta2 = g["betas"]
            lr = g["lr"]
            bc1 = 1 - beta1**t
            coef = torch.stack(
                [
                    torch.full((), 1 - lr * g["weight_decay"], device=dev),
                    lr / bc1,
                    torch.rsqrt(1 - beta2**t),
                    inv_scale,
                    keep,
                    torch.full((), g["eps"], device=dev),
                ]
            ).float()
            for a, b, update in _passes(dev, start, end):
                update(
                    f.master[a:b], f.param[a:b], f.grad[a:b],
                    self.exp_avg[a:b], self.exp_avg_sq[a:b], coef, beta1, beta2,
                )  # fmt: skip

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``.grad`` to None (the flat buffers are overwritten by the next step's gradients)."""
        self.flat.zero_grads()

    def begin_micro_batch(self, index: int, count: int) -> None:
        """Before micro-batch ``index`` of ``count`` (``FlatParams.begin_micro_batch``)."""
        self.flat.begin_micro_batch(index, count)

    def end_micro_batch(self) -> None:
        """After its backward (``FlatParams.end_micro_batch``)."""
        self.flat.end_micro_batch()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch AdamW's state dict format (ours, or the FSDP2 path's) into the flat
        buffers: groups matched in order, parameters by position within each group."""
        saved = state_dict["param_groups"]
        sizes = [len(g["params"]) for g in self.param_groups]
        if [len(g["params"]) for g in saved] != sizes:
            raise ValueError(
                f"optimizer state of {[len(g['params']) for g in saved]} parameters per group "
                f"does not match this optimizer's {sizes}"
            )
        state = state_dict["state"]
        steps = []
        with torch.no_grad():
            for g, sg in zip(self.param_groups, saved):
                for k, v in sg.items():
                    if k in ("lr", "betas", "eps", "weight_decay"):
                        g[k] = v
                for p, key in zip(g["params"], sg["params"]):
                    s = state.get(key)
                    if not s:
                        continue
                    ours = self.state[p]
                    for name in ("exp_avg", "exp_avg_sq"):
                        if s[name] is not ours[name]:
                            ours[name].copy_(s[name])
                    steps.append(torch.as_tensor(s["step"], dtype=torch.float32))
        if steps:
            self.t.copy_(steps[0])
