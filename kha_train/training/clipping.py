"""Gradient clipping (``optim.clip_mode``), decided on the device without a host sync.

``global_norm`` (the default): every gradient times min(1, grad_clip / (g + 1e-6)), g the global
grad norm (torch's ``clip_grad_norm_`` rule). Stateless.

``zclip`` (ZClip, Kumar et al. 2025, arXiv:2504.02507; ``optim.zclip``, defaults alpha 0.97,
z_threshold 2.5, warmup 25 as in the authors' code, github.com/bluorion-com/ZClip)::

    warmup (the first ``warmup`` applied steps): clip to grad_clip, collect g;
        then m = mean, v = population variance of the collected norms
    after: z = (g - m) / (sqrt(v) + 1e-6)
        z > z_threshold: clip to  c = m + z_threshold sqrt(v) / (z / z_threshold)
        (the further out, the lower the limit: ZClip's "adaptive_scaling")
        the limit is min(c, grad_clip) when grad_clip > 0 (ZClip's max_grad_norm)
        EMA with e = c on a spike, g otherwise:  m <- a m + (1 - a) e,  v <- a v + (1 - a)(e - m)^2

``adagc`` (AdaGC, Wang et al. 2025, arXiv:2502.11034; ``optim.adagc``, defaults ratio 1.04,
beta 0.99, warmup 100 as in the authors' PyTorch code, github.com/lishuai-97/AdaGC; the
third-party pytorch_optimizer port uses 1.05 and 0.98), for each parameter tensor i with
gradient norm n_i over all its shards::

    warmup (the first ``warmup`` applied steps): global clip to grad_clip (lambda_abs);
        gamma_i = the smallest clipped n_i seen
    after: n_i > ratio gamma_i: g_i <- g_i ratio gamma_i / (n_i + 1e-6)
        gamma_i <- beta gamma_i + (1 - beta) min(n_i, ratio gamma_i)

One deviation from the reference: a tensor whose gradient is exactly zero (no tokens reached
it, or everything downstream of it is zero at init) leaves its gamma alone, instead of pulling
it to 0, which would freeze that tensor's gradient at zero for good.

Every clipper has ``clip(optimizer, params, grad_norm, ok)``, called after the global grad norm
and before ``optimizer.step()``, and ``state_dict()`` / ``load_state_dict()`` (JSON, in the
trainer state, exact on resume). ``ok`` is whether the step is applied (finite and not skipped
by the spike guard, ``spike_guard.py``): a step that is not applied leaves the clip state as
it was, as it leaves the rest of the training state. Global-norm and ZClip scale every gradient
by one factor, which the fused AdamW applies as it reads the gradients (its ``grad_scale``
input, no extra pass); AdaGC scales each tensor by its own factor: one foreach pass over the
local shards, and one all-reduce of one float per tensor for the norms (``optim.py``).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from kha_train.config import ClipMode, OptimConfig
from kha_train.training.optim import (
    clip_gradients,
    clip_gradients_to,
    is_fused,
    scale_gradients_each,
    tensor_grad_norms,
)

EPS = 1e-6  # added to norms in divisions (both references use 1e-6)


class Clipper(Protocol):
    def clip(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        grad_norm: torch.Tensor,
        ok: torch.Tensor,
    ) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class GlobalNormClip:
    """optim.clip_mode=global_norm: clip the global norm to ``max_norm`` (<= 0: off)."""

    mode = ClipMode.global_norm

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def clip(self, optimizer, params, grad_norm, ok) -> None:
        clip_gradients(optimizer, params, grad_norm, self.max_norm)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ZClip:
    """optim.clip_mode=zclip (module docstring). State on the device, float64."""

    mode = ClipMode.zclip

    def __init__(self, alpha: float, z_threshold: float, warmup: int, cap: float,
                 device: torch.device) -> None:  # fmt: skip
        self.alpha, self.z_threshold, self.warmup, self.cap = alpha, z_threshold, warmup, cap
        f64 = {"dtype": torch.float64, "device": device}
        self.mean = torch.zeros((), **f64)
        self.var = torch.zeros((), **f64)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)  # applied warmup steps
        self.norms = torch.zeros(warmup, **f64)  # the warmup's grad norms

    def limit(self, grad_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the step's clip limit, inf for none; whether g is an outlier; its clip value c)."""
        g = grad_norm.detach().to(torch.float64)
        ready = self.seen >= self.warmup
        std = self.var.sqrt()
        z = (g - self.mean) / (std + EPS)
        outlier = ready & (z > self.z_threshold)
        c = self.mean + self.z_threshold * std / (z / self.z_threshold)
        limit = torch.where(outlier, c, math.inf)
        if self.cap > 0:
            limit = limit.clamp(max=self.cap)
        return limit, outlier, c

    @torch.no_grad()
    def clip(self, optimizer, params, grad_norm, ok) -> None:
        limit, outlier, c = self.limit(grad_norm)
        clip_gradients_to(optimizer, params, grad_norm, limit.float())
        g = grad_norm.detach().to(torch.float64)
        ready = self.seen >= self.warmup
        e = torch.where(outlier, c, g)
        mean = self.alpha * self.mean + (1 - self.alpha) * e
        var = self.alpha * self.var + (1 - self.alpha) * (e - mean).square()
        collect = ok & ~ready
        slot = self.seen.clamp(max=self.warmup - 1).view(1)
        self.norms.index_copy_(0, slot, torch.where(collect, g, self.norms.index_select(0, slot)))
        seen = self.seen + collect.long()
        start = collect & (seen == self.warmup)  # the warmup's last norm: the EMA starts
        w_mean = self.norms.mean()
        w_var = (self.norms - w_mean).square().mean()
        update = ok & ready
        self.mean.copy_(torch.where(update, mean, torch.where(start, w_mean, self.mean)))
        self.var.copy_(torch.where(update, var, torch.where(start, w_var, self.var)))
        self.seen.copy_(seen)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "mean": self.mean.item(),
            "var": self.var.item(),
            "seen": int(self.seen.item()),
            "norms": self.norms.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean.fill_(float(state["mean"]))
        self.var.fill_(float(state["var"]))
        seen, saved = int(state["seen"]), torch.tensor(state["norms"], dtype=torch.float64)
        self.norms.zero_()
        if len(saved) == self.warmup:
            self.norms.copy_(saved)
        elif seen < len(saved):  # in the middle of a warmup of another length: start it over
            seen = 0
        else:  # the EMA had started: keep it
            seen = max(seen, self.warmup)
        self.seen.fill_(seen)


class AdaGC:
    """optim.clip_mode=adagc (module docstring). ``gamma`` (one fp32 per parameter tensor, +inf
    until the tensor's first nonzero norm) is created at the first step."""

    mode = ClipMode.adagc

    def __init__(self, ratio: float, beta: float, warmup: int, global_clip: float,
                 device: torch.device) -> None:  # fmt: skip
        self.ratio, self.beta, self.warmup, self.global_clip = ratio, beta, warmup, global_clip
        self.device = device
        self.gamma: torch.Tensor | None = None
        self.seen = torch.zeros((), dtype=torch.int64, device=device)  # applied steps

    def coefficients(
        self, norms: torch.Tensor, grad_norm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(each tensor's clip factor, each tensor's clipped norm as its EMA sees it)."""
        if self.gamma is None:
            self.gamma = torch.full_like(norms, math.inf)
        elif self.gamma.shape != norms.shape:
            raise ValueError(
                f"AdaGC state holds {self.gamma.numel()} tensors, the model {norms.numel()}"
            )
        warm = self.seen < self.warmup
        if self.global_clip > 0:
            g_coef = torch.clamp(self.global_clip / (grad_norm.detach().float() + EPS), max=1.0)
        else:
            g_coef = torch.ones((), device=norms.device)
        limit = self.ratio * self.gamma
        over = torch.isfinite(self.gamma) & (norms > limit)
        coef = torch.where(warm, g_coef, torch.where(over, limit / (norms + EPS), 1.0))
        clipped = torch.where(warm, norms * g_coef, torch.where(over, limit, norms))
        return coef, clipped

    @torch.no_grad()
    def clip(self, optimizer, params, grad_norm, ok) -> None:
        present = [i for i, p in enumerate(params) if p.grad is not None]
        grads = [params[i].grad for i in present]
        norms = tensor_grad_norms(grads)  # type: ignore[arg-type]
        if len(present) < len(params):  # a parameter without a gradient: norm 0, left alone
            zero = norms.new_zeros(())
            per_param = [zero] * len(params)
            for j, i in enumerate(present):
                per_param[i] = norms[j]
            norms = torch.stack(per_param)
        coef, clipped = self.coefficients(norms, grad_norm)
        if is_fused(optimizer):
            optimizer.grad_scale = None  # type: ignore[attr-defined]  # clipped here, per tensor
        factors = coef.unbind()
        scale_gradients_each(grads, [factors[i] for i in present])  # type: ignore[arg-type]
        assert self.gamma is not None
        gamma, warm = self.gamma, self.seen < self.warmup
        seen_it = clipped > 0  # a zero gradient says nothing about the tensor's scale
        known = torch.isfinite(gamma)
        during = torch.minimum(gamma, clipped)
        after = torch.where(known, self.beta * gamma + (1 - self.beta) * clipped, clipped)
        new = torch.where(seen_it, torch.where(warm, during, after), gamma)
        self.gamma = torch.where(ok, new, gamma)
        self.seen.copy_(self.seen + ok.long())

    def state_dict(self) -> dict[str, Any]:
        gamma = None if self.gamma is None else self.gamma.tolist()
        return {
            "mode": self.mode.value,
            "seen": int(self.seen.item()),
            # JSON has no inf: None stands for a tensor not seen yet
            "gamma": None if gamma is None else [x if math.isfinite(x) else None for x in gamma],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen.fill_(int(state["seen"]))
        gamma = state.get("gamma")
        self.gamma = (
            None
            if gamma is None
            else torch.tensor([math.inf if x is None else x for x in gamma], device=self.device)
        )


def build_clipper(cfg: OptimConfig, device: torch.device) -> Clipper:
    """The clipper of ``optim.clip_mode``."""
    match ClipMode(cfg.clip_mode):
        case ClipMode.global_norm:
            return GlobalNormClip(cfg.grad_clip)
        case ClipMode.zclip:
            z = cfg.zclip
            return ZClip(z.alpha, z.z_threshold, z.warmup, cfg.grad_clip, device)
        case ClipMode.adagc:
            a = cfg.adagc
            return AdaGC(a.ratio, a.beta, a.warmup, cfg.grad_clip, device)
    raise ValueError(f"unknown optim.clip_mode {cfg.clip_mode!r}: global_norm, zclip or adagc")


def load_clip_state(clipper: Clipper, state: dict[str, Any] | None) -> bool:
    """Restore ``clipper`` from a checkpoint's clip state if it is of the same mode; returns
    whether it did (a changed optim.clip_mode starts the new mode fresh)."""
    if not state or state.get("mode") != getattr(clipper, "mode", None):
        return False
    clipper.load_state_dict(state)
    return True
