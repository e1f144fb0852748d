"""Which part of the model a step's gradient norm comes from.

The step's global gradient norm (before clipping) is taken from the per-tensor norms, which
split it by part for free: ``||g||^2 = sum over parts of ||g_part||^2``. One matrix product on
the device adds each tensor's square into its part; the history keeps the parts beside the loss
and the norm, and the records of spiking, skipped and non-finite steps carry them
(``grad_norm_parts``), so `kha-train spikes` can say whether a spike came from the embedding,
the router, the experts or attention.

Parts, by parameter name (the first rule that matches; wrappers' name segments are ignored):

    embedding     the token embedding and the LM head
    norms         every RMSNorm weight (blocks', QK-norm's, the final one, MEA's head norm)
    head_mixing   KHA, MEA's head-level composition, talking heads (``kha``, ``hlc``, ``_mix``)
    router        the MoE routers
    experts       the routed experts
    attention     the rest of attention (q, k, v, o projections and their variants)
    ffn           dense FFNs and shared experts
    other         anything else
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.training.optim import tensor_grad_norms

PARTS = ("embedding", "norms", "head_mixing", "router", "experts", "attention", "ffn", "other")
WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def part_of(name: str) -> str:
    """The part (``PARTS``) of the parameter called ``name`` in ``model.named_parameters()``."""
    segments = [s for s in name.split(".") if s not in WRAPPERS]
    if segments[0] in ("embed_tokens", "lm_head"):
        return "embedding"
    modules = segments[:-1]
    if modules and "norm" in modules[-1]:
        return "norms"
    if any(k in s for s in segments for k in ("kha", "hlc", "_mix")):
        return "head_mixing"
    for part, key in (("router", "router"), ("experts", "experts"), ("attention", "attn")):
        if key in modules:
            return part
    if "ffn" in modules or any("shared" in s for s in modules):
        return "ffn"
    return "other"


class GradParts:
    """The trainable parameters of a model in ``model.parameters()`` order, and the part of
    each: :meth:`norms` gives the global gradient norm and the norm of each part present."""

    def __init__(self, model: nn.Module) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        index = [PARTS.index(part_of(n)) for n, _ in named]
        self.names = [p for i, p in enumerate(PARTS) if i in index]  # the parts present, in order
        self._row = [self.names.index(PARTS[i]) for i in index]  # each parameter's part row
        # (parts, n) 0/1 matrices, by the parameters that have a gradient: all of them (made
        # here, where a copy to the device may wait) and any other set a step meets.
        self._sum: dict[tuple[int, ...], torch.Tensor] = {}
        if self.params:
            self._matrix(tuple(range(len(self.params))), self.params[0].device)

    def _matrix(self, have: tuple[int, ...], device: torch.device) -> torch.Tensor:
        sums = torch.zeros(len(self.names), len(have))
        for j, i in enumerate(have):
            sums[self._row[i], j] = 1.0
        self._sum[have] = sums = sums.to(device)
        return sums

    def norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(global gradient norm (), each part's norm (len(names),)) over every rank, fp32 on
        the device, no host sync. Parameters without a gradient count as zero."""
        have = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        per_tensor = tensor_grad_norms([self.params[i].grad for i in have])  # (n,)
        sums = self._sum.get(have)
        if sums is None:
            sums = self._matrix(have, per_tensor.device)
        parts_sq = sums @ per_tensor.square()
        return parts_sq.sum().sqrt(), parts_sq.sqrt()
