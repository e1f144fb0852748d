"""Rotary position embedding (Su et al. 2021) in the half-split layout of Qwen / Hugging Face.

Head features are split into halves (x1, x2) and each pair (x1[j], x2[j]) is rotated by the
angle pos * theta^(-2j / head_dim). The inverse frequencies are a buffer filled by
``reset_parameters`` (so the model can be built on the meta device); the cos/sin tables are
recomputed each forward for the actual sequence length (T x head_dim/2 values: negligible).
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        # Not persistent: a pure function of the config, so it stays out of checkpoints. Filled
        # here unless built on the meta device, so that a model that loads a state dict without
        # init_weights() does not rotate by whatever the memory held.
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        if self.inv_freq.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)
        with torch.no_grad():
            self.inv_freq.copy_(inv_freq.to(self.inv_freq.dtype))

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables, each [seq_len, head_dim // 2] in fp32."""
        pos = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq.float())  # (T, head_dim/2)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, heads, head_dim] by the tables from :class:`RotaryEmbedding` (in fp32)."""
    half = x.shape[-1] // 2
    cos = cos[None, :, None, :]  # (1, T, 1, head_dim/2)
    sin = sin[None, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
