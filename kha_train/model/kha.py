"""Knocking-heads projections (Zhou et al. 2025, arXiv 2510.23052, section 3).

Each module acts on the features *inside* every head with one d_head x d_head matrix (or three,
for the MLP) shared by all heads of its target (all query heads for q, all KV heads for k/v).
Heads are processed together as one matmul over [B, T, heads, d_head] @ [d_head, d_head].
Matrices are stored in the paper's orientation (row vectors times matrix: y = x @ T).

Every variant is *exactly* the identity at initialisation (paper 3.3), so a KHA model starts
out computing the same function as the model without KHA:

- linear (eqs. 5-7):  y = x T,                                   T = I
- mlp    (eq. 9):     y = 2 * ((x W_up) * sigmoid(x W_gate)) W_down, W_up = W_down = I, W_gate = 0
- gate   (Table 2):   y = x * 2 sigmoid(x W_gate),               W_gate = 0   (an ablation that hurts)

Every kind is a :class:`KHA`: it applies itself to activations (``kha(x)``), and it knows which
of its parts an attention module may move into a weight instead (the same function and
gradients, in a cheaper order). T sits between the projection x W^T and, for V, the output
projection o W^O, so it splits into three parts, each evaluated where it is cheapest:

    F.linear(x, T.fold_into_projection(W))     its linear first part in W (KHA-Linear: all of T)
    T.on_activations(h, output_folded)         the rest, on the heads h [B, T, heads, d]
    F.linear(o, T.fold_into_output(W^O))       its linear last part in W^O (KHA-MLP's W_down;
                                               V only, where o is linear in v: folds_into_output)

For export, ``absorb_into_rows`` / ``absorb_into_output`` fold all of T into a weight in place
where T is linear (KHA-Linear); ``tools/absorb.py`` says which weight, per attention variant.
Each kind also counts its training FLOPs beyond 6 x parameters and its activation bytes
(``flops.py``). A target without KHA is None in the attention module (no submodule, no
state-dict keys); :func:`qkv_transforms` puts :data:`NO_KHA`, the identity, in its place.
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.config import KHAVariant
from kha_train.model.init import fill_identity_


class KHA(nn.Module):
    """The interface of a knocking-heads transform of one target, y = T(x) for x [B, T, heads, d],
    and its trivial kind: no knocking, T(x) = x, which stands in for a target without KHA."""

    # bf16 bytes autograd keeps per value of the target (accounting; rough, like the rest).
    activation_bytes_per_value = 0
    # Whether T ends in a linear part that ``fold_into_output`` can move past attention.
    folds_into_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, heads, d)
        return x

    def fold_into_projection(self, weight: torch.Tensor) -> torch.Tensor:
        """The projection weight [heads * d, D] with T's linear first part folded in."""
        return weight

    def on_activations(self, x: torch.Tensor, output_folded: bool = False) -> torch.Tensor:
        """What is left of T for x [B, T, heads, d] once ``fold_into_projection`` has been applied
        to its projection, and ``fold_into_output`` to the output projection if output_folded."""
        return self(x)

    def fold_into_output(self, o_weight: torch.Tensor) -> torch.Tensor:
        """The output projection's weight [D, heads * d] with T's linear last part folded in (only
        for V, and only where the output is linear in the values head by head)."""
        return o_weight

    def absorb_into_rows(self, weight: torch.Tensor, rows: int, first: int = 0) -> bool:
        """In place, for export: fold all of T into rows [first, first + d) of every block of
        ``rows`` rows (one block per head) of ``weight``. False where T is not linear."""
        return False

    def absorb_into_output(self, o_weight: torch.Tensor) -> bool:
        """In place, for export: fold all of T (on V) into the columns of the output projection
        [D, heads * d]. False where T is not linear."""
        return False

    def flops_per_token(self, heads: int) -> int:
        """Training FLOPs per token beyond 6 x parameters: every matrix acts on each of ``heads``
        heads, where 6 N counts one use (paper eq. 12 counts them all)."""
        return 6 * sum(p.numel() for p in self.parameters()) * (heads - 1)

    def activation_bytes_per_token(self, width: int) -> int:
        """Rough bytes autograd keeps for T per token of a target ``width`` values wide."""
        return self.activation_bytes_per_value * width

    def reset_parameters(self) -> None:
        pass

    def initial_value(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """What parameter ``name`` (``weight``: its value, any dtype) starts as: I, or 0 for
        a gate (whose 2 sigmoid(0) = 1 makes the identity). For the drift metric."""
        if name.startswith("w_gate"):
            return torch.zeros_like(weight)
        return torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)


def drift_from_init(module: KHA, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the transform's matrices of ||W - W_0||_F / ||I||_F (Fig. 3's "distance from
    the identity", 0 at init; 1 is a move as large as the identity itself), a float32 scalar on
    the weights' device. ``weights``: the module's parameters by name (whole tensors: the caller
    gathers shards)."""
    out = [
        (w.detach().float() - module.initial_value(name, w.detach().float())).norm()
        / w.shape[0] ** 0.5
        for name, w in weights.items()
    ]
    return torch.stack(out).mean() if out else torch.zeros(())


NO_KHA = KHA()  # the identity: nothing to fold, absorb or count


class KHALinear(KHA):
    """y = x @ T with one T [d_head, d_head] shared by all heads.

    Trained folded into the projection (paper eq. 8 in training too): x (W T) instead of (x W) T,
    heads * d^2 * D multiply-adds per forward instead of tokens * heads * d^2 (for the A0.44B
    model at 16k tokens per micro-batch, 1.2 instead of 17 GFLOP for T^Q)."""

    # Its input, where it is applied to activations (GTA, MLA); nothing when folded, but rough.
    activation_bytes_per_value = 2

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, heads, d_head)
        return x @ self.weight.to(x.dtype)

    def fold_into_projection(self, weight: torch.Tensor) -> torch.Tensor:
        """Head h's rows W_h become T^T W_h, so x W'^T equals (x W^T) T head by head: the same
        function with the same gradients for W and T. At init T = I and the fold is exact."""
        d = self.weight.shape[0]
        t = self.weight.to(weight.dtype)
        return (t.T @ weight.view(-1, d, weight.shape[-1])).view_as(weight)  # (heads * d, D)

    def on_activations(self, x: torch.Tensor, output_folded: bool = False) -> torch.Tensor:
        return x  # all of T is in the projection weight

    @torch.no_grad()
    def absorb_into_rows(self, weight: torch.Tensor, rows: int, first: int = 0) -> bool:
        d = self.weight.shape[0]
        w = weight.view(-1, rows, weight.shape[1])  # (heads, rows per head, in)
        part = w[:, first : first + d]  # (heads, d, in): the rows T acts on
        part.copy_(torch.matmul(self.weight.T.to(w.dtype), part))  # T^T @ W_i
        return True

    @torch.no_grad()
    def absorb_into_output(self, o_weight: torch.Tensor) -> bool:
        """out = sum_i (o_i T) W_i^T = sum_i o_i (W_i T^T)^T: each head's column block W_i
        [D, d] of the output projection becomes W_i @ T^T."""
        d = self.weight.shape[0]
        w = o_weight.view(o_weight.shape[0], -1, d)  # (D, heads, d)
        w.copy_(torch.matmul(w.transpose(0, 1), self.weight.T.to(w.dtype)).transpose(0, 1))
        return True

    def reset_parameters(self) -> None:
        fill_identity_(self.weight)


class KHAMLP(KHA):
    """y = 2 * ((x W_up) * sigmoid(x W_gate)) W_down, all three [d_head, d_head], shared by heads.

    On V, W_down can move past attention into W^O (attention is linear in V and W_down acts on
    each head's features alone): softmax(.) (h W_down) = (softmax(.) h) W_down, and
    o_h W_down W_O,h^T = o_h (W_O,h W_down^T)^T. Same function and gradients, without a
    [tokens * kv_heads, d] x [d, d] GEMM (forward and backward) per layer; the fold costs
    D * H * d^2."""

    # Its input, x [W_up | W_gate] (twice as wide) and the gated product.
    activation_bytes_per_value = 8
    folds_into_output = True  # W_down

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.w_up = nn.Parameter(torch.empty(head_dim, head_dim))
        self.w_gate = nn.Parameter(torch.empty(head_dim, head_dim))
        self.w_down = nn.Parameter(torch.empty(head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, heads, d_head)
        return self.gated(x) @ self.w_down.to(x.dtype)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """2 * (x W_up) * sigmoid(x W_gate): the MLP before W_down."""
        # x W_up and x W_gate as one matmul against [W_up | W_gate] (d, 2d): one GEMM instead of
        # two, forward and backward (these GEMMs are small: a launch saved is time saved).
        w_up_gate = torch.cat([self.w_up, self.w_gate], dim=1).to(x.dtype)  # (d, 2d)
        up, gate = (x @ w_up_gate).chunk(2, dim=-1)  # (B, T, heads, d) each
        # The factor 2 makes 2 * sigmoid(0) = 1: the identity at init.
        return 2 * (up * torch.sigmoid(gate))

    def on_activations(self, x: torch.Tensor, output_folded: bool = False) -> torch.Tensor:
        return self.gated(x) if output_folded else self(x)

    def fold_into_output(self, o_weight: torch.Tensor) -> torch.Tensor:
        """Each head's column block W_O,h [D, d] becomes W_O,h W_down^T."""
        d = self.w_down.shape[0]
        down = self.w_down.to(o_weight.dtype)
        return (o_weight.view(o_weight.shape[0], -1, d) @ down.T).view_as(o_weight)  # (D, H * d)

    def reset_parameters(self) -> None:
        fill_identity_(self.w_up)
        fill_identity_(self.w_down)
        nn.init.zeros_(self.w_gate)


class KHAGate(KHA):
    """y = x * 2 sigmoid(x W_gate): the paper's gate-only ablation (Table 2, +0.063 loss)."""

    # Its input and x W_gate.
    activation_bytes_per_value = 4

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(head_dim, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, heads, d_head)
        return x * (2 * torch.sigmoid(x @ self.w_gate.to(x.dtype)))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.w_gate)


def build_kha(variant: KHAVariant, head_dim: int) -> KHA | None:
    """The KHA module of one target (q, k or v), or None for variant none."""
    match variant:
        case KHAVariant.none:
            return None
        case KHAVariant.linear:
            return KHALinear(head_dim)
        case KHAVariant.mlp:
            return KHAMLP(head_dim)
        case KHAVariant.gate:
            return KHAGate(head_dim)
    raise ValueError(f"unknown model.kha.variant {variant!r}: use none, linear, mlp or gate")


def build_kha_targets(
    variant: KHAVariant, targets: list[str], head_dim: int
) -> tuple[KHA | None, KHA | None, KHA | None]:
    """The KHA modules of q, k and v (None for a target not in ``targets``), as every attention
    module stores them: ``self.kha_q, self.kha_k, self.kha_v = build_kha_targets(...)``."""

    def one(target: str) -> KHA | None:
        return build_kha(variant, head_dim) if target in targets else None

    return one("q"), one("k"), one("v")


def qkv_transforms(attn: nn.Module) -> tuple[KHA, KHA, KHA]:
    """T^Q, T^K, T^V of an attention module: its kha_q, kha_k and kha_v, with :data:`NO_KHA`
    for a target without KHA (or whose KHA-Linear was absorbed)."""
    q, k, v = attn.kha_q, attn.kha_k, attn.kha_v
    return (
        NO_KHA if q is None else q,
        NO_KHA if k is None else k,
        NO_KHA if v is None else v,
    )
