"""The dense SwiGLU feed-forward network (Shazeer 2020): down(silu(x W_gate) * x W_up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kha_train.model.init import trunc_normal_


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def reset_parameters(self, std: float, out_std: float) -> None:
        trunc_normal_(self.gate_proj.weight, std)
        trunc_normal_(self.up_proj.weight, std)
        trunc_normal_(self.down_proj.weight, out_std)
