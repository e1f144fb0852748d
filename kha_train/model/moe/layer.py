"""The routed MoE feed-forward layer: route, dispatch, grouped experts, weighted combine.

Dropless token-choice routing with no host-device sync:

    1. router: expert ids [N, K] and gate weights [N, K] per token (router.py)
    2. sort the N*K (token, slot) assignments by expert id (stable argsort); the counts per
       expert (scatter_add) give the grouped-GEMM offsets (cumsum, int32)
    3. gather token rows in that order, run every expert over its rows (experts.py)
    4. put rows back in (token, slot) order and sum the K outputs of each token weighted by g

Counts of assignments per expert accumulate in the ``expert_counts`` buffer during training
forwards (not under no_grad / eval, and not when activation checkpointing re-runs the forward
inside backward); ``balance.update_expert_bias`` consumes them once per optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn

from kha_train.config import Balancing, MoEConfig
from kha_train.model.ffn import SwiGLU
from kha_train.model.moe.dispatch import combine_rows, dispatch_rows, inverse_permutation
from kha_train.model.moe.experts import GroupedExperts
from kha_train.model.moe.router import Router


class MoELayer(nn.Module):
    def __init__(self, dim: int, moe: MoEConfig) -> None:
        super().__init__()
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.balancing = Balancing(moe.balancing)
        self.bias_update_rate = moe.bias_update_rate
        self.aux_loss_coef = moe.aux_loss_coef
        self.router = Router(dim, moe.num_experts, moe.top_k, moe.score_func, moe.norm_topk_prob)
        self.experts = GroupedExperts(dim, moe.expert_ffn_size, moe.num_experts)
        self.shared_experts = (
            SwiGLU(dim, moe.num_shared_experts * moe.expert_ffn_size)
            if moe.num_shared_experts > 0
            else None
        )
        # Assignments per expert since the last bias update (fp32: exact up to 2^24 per step and
        # per layer on each rank; summed over ranks by the trainer). Not persistent: it is zero
        # whenever a checkpoint is taken (right after the update).
        self.register_buffer("expert_counts", torch.zeros(moe.num_experts), persistent=False)
        self._aux_loss: torch.Tensor | None = None

    @property
    def expert_bias(self) -> torch.Tensor:
        return self.router.expert_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        K, E = self.top_k, self.num_experts
        x_flat = x.reshape(B * T, D)  # (N, D)
        expert_ids, gates, scores = self.router(x_flat)  # (N, K), (N, K), (N, E)
        flat_ids = expert_ids.reshape(-1)  # (N*K,) expert of each (token, slot)
        counts = torch.zeros(E, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))  # (E,)
        if self._counting():
            self.expert_counts.add_(counts.to(self.expert_counts.dtype))
        if self.balancing == Balancing.aux_loss and self.training and torch.is_grad_enabled():
            self._aux_loss = self._switch_aux_loss(scores, counts)

        # Dispatch: a stable sort keeps tokens in order within each expert's group.
        order = torch.argsort(flat_ids, stable=True)  # (N*K,) slot index of each sorted row
        inverse = inverse_permutation(order)  # (N*K,) sorted row of each slot
        x_sorted = dispatch_rows(x_flat, order, inverse, K)  # (N*K, D)
        y_sorted = self.experts(x_sorted, counts)  # (N*K, D)
        # Combine: slot j takes sorted row inverse[j]; then a weighted sum over the K slots.
        y = combine_rows(y_sorted, order, inverse).view(B * T, K, D)
        # An elementwise product and a sum over K (fused by torch.compile), not a batched
        # matmul: cuBLAS runs (N,1,K)@(N,K,D) and its backward as slow batched GEMVs.
        out = (y.float() * gates.unsqueeze(-1)).sum(dim=1).to(y.dtype)  # (N, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        return out.view(B, T, D).to(x.dtype)

    def _counting(self) -> bool:
        """Whether this forward's assignments count toward the next bias update."""
        if not (self.training and torch.is_grad_enabled()):
            return False  # evaluation / validation must not move the bias
        if torch.compiler.is_compiling():
            # Compiled graphs apply buffer updates in their forward only; a recompute inside the
            # compiled backward re-runs no side effects.
            return True
        # Inside backward means activation checkpointing is re-running this forward.
        return torch._C._current_graph_task_id() == -1

    def _switch_aux_loss(self, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """coef * E * sum_i f_i P_i (Switch Transformer): f_i = share of assignments (no grad),
        P_i = mean routing probability of expert i."""
        probs = scores / scores.sum(dim=-1, keepdim=True)  # softmax: unchanged; sigmoid: normalised
        f = counts.float() / counts.sum().clamp_min(1)
        return self.aux_loss_coef * self.num_experts * (f * probs.mean(dim=0)).sum()

    def take_aux_loss(self) -> torch.Tensor | None:
        """The aux loss of the last training forward (then forgotten, so no graph is kept alive)."""
        loss, self._aux_loss = self._aux_loss, None
        return loss

    def reset_parameters(self, std: float, out_std: float) -> None:
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(std, out_std)
        nn.init.zeros_(self.expert_counts)
