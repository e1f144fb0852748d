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


@torch.library.custom_op("kha_train::mm_fp32_out", mutates_args=())
def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] of 16-bit operands, accumulated and returned in fp32 (one tensor-core
    GEMM on CUDA). An opaque op to torch.compile, which has no lowering for ``out_dtype``."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


@mm_fp32_out.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


class _LogitsFp32Out(torch.autograd.Function):
    """logits = x W^T in fp32 from 16-bit x and W. The backward runs in the operands' dtype
    (like every other weight gradient of a bf16 model): g is rounded to x.dtype once."""

    @staticmethod
    def forward(ctx, x, weight):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return mm_fp32_out(x, weight.t())

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g = g.to(x.dtype)
        return g @ weight, g.t() @ x


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, D] @ weight [E, D]^T with fp32 output whatever the compute dtype: near-ties between
    experts decide routing, so logits are never rounded to bf16.

    With bf16 operands (FSDP mixed precision) the product of the bf16 values is exact in fp32
    accumulation, so a tensor-core GEMM with fp32 output gives the fp32 result without upcast
    copies or an fp32 (SIMT) GEMM, which cost ~3 ms per micro-batch at the reference size."""
    if x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
        return _LogitsFp32Out.apply(x, weight)
    # fp32 weights (fp32 training, or autocast, where F.linear alone would run in bf16).
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())


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
        logits = router_logits(x, self.weight)  # (N, E) fp32
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
