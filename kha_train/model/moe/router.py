"""Top-k token-choice router with a selection-only bias (auxiliary-loss-free balancing).

    s      = softmax(x W_r^T)  or  sigmoid(x W_r^T)      in fp32, W_r: [E, D]
    chosen = top-k_i (s_i + b_i)                          the bias b steers selection only
    g      = s[chosen]  (/ sum s[chosen] if norm_topk_prob)   gate weights from unbiased scores

The bias ``expert_bias`` is a persistent buffer (so it is checkpointed) moved by
``balance.update_expert_bias`` once per optimizer step (Wang et al. 2024, arXiv 2408.15664).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kha_train.config import ScoreFunc
from kha_train.model.init import trunc_normal_


class Router(nn.Module):
    def __init__(
        self, dim: int, num_experts: int, top_k: int, score_func: ScoreFunc, norm_topk: bool
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_func = ScoreFunc(score_func)
        self.norm_topk = norm_topk
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("expert_bias", torch.empty(num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> expert ids [N, K] (int64), gate weights [N, K] and scores [N, E] (fp32)."""
        # Scores in fp32 whatever the compute dtype: under autocast F.linear would run in bf16,
        # and near-ties between experts decide routing.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        match self.score_func:
            case ScoreFunc.softmax:
                scores = logits.softmax(dim=-1)
            case ScoreFunc.sigmoid:
                scores = logits.sigmoid()
        # The bias only picks the experts; it carries no gradient and never enters the weights.
        _, expert_ids = torch.topk(scores.detach() + self.expert_bias, self.top_k, dim=-1)  # (N, K)
        gates = scores.gather(-1, expert_ids)  # (N, K)
        if self.norm_topk:
            gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return expert_ids, gates, scores

    def reset_parameters(self, std: float) -> None:
        trunc_normal_(self.weight, std)
        nn.init.zeros_(self.expert_bias)
