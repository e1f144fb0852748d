"""KHA-Linear is evaluated folded into the projection weights during training: the same
function and the same gradients as transforming the activations (paper eqs. 5-8)."""

from __future__ import annotations

import torch

from kha_train.config import KHAConfig, KHAVariant, ModelConfig
from kha_train.model.attention import Attention


def test_folded_kha_linear_equals_activation_order() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
        kha=KHAConfig(variant=KHAVariant.linear, targets=["q", "k", "v"]),
    )  # fmt: skip
    attn = Attention(cfg).double()
    attn.reset_parameters(0.2, 0.2)
    for m in (attn.kha_q, attn.kha_k, attn.kha_v):
        m.weight.data += 0.1 * torch.randn_like(m.weight)  # a learnt, non-identity T
    x = torch.randn(2, 5, 32, dtype=torch.float64)

    def activation_order() -> tuple[torch.Tensor, ...]:
        B, T, _ = x.shape
        q = (x @ attn.q_proj.weight.T).view(B, T, 4, 8) @ attn.kha_q.weight
        k = (x @ attn.k_proj.weight.T).view(B, T, 2, 8) @ attn.kha_k.weight
        v = (x @ attn.v_proj.weight.T).view(B, T, 2, 8) @ attn.kha_v.weight
        return q, k, v

    ours, ref = attn.knock(*attn.project(x)), activation_order()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    params = [p for p in attn.parameters() if p.requires_grad]
    g = [torch.randn_like(t) for t in ref]
    grads = torch.autograd.grad(ours, params, g, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, params, g, allow_unused=True)
    for name, a, b in zip([n for n, _ in attn.named_parameters()], grads, grads_ref):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
        else:
            torch.testing.assert_close(a, b, msg=name)
