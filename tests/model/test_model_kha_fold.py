"""KHA-Linear is evaluated folded into the projection weights during training: the same
function and the same gradients as transforming the activations (paper eqs. 5-8)."""

from __future__ import annotations

import pytest
import torch

from kha_train.config import KHAConfig, KHAVariant, MEAConfig, ModelConfig
from kha_train.model import Transformer
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


@pytest.mark.parametrize(
    ("attention", "mea_head_norm", "folds"),
    [
        ("gqa", True, True),
        ("talking_heads", True, True),
        ("mea", False, True),
        ("mea", True, False),
    ],
)
def test_kha_mlp_down_folded_into_output_equals_applying_it_to_v(
    attention: str, mea_head_norm: bool, folds: bool
) -> None:
    """KHA-MLP on V with W_down inside o_proj: the same output and gradients as applying the
    whole MLP to V (attention is linear in V); MEA's head norm in between keeps it on V."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
        attention=attention, attn_backend="math", mea=MEAConfig(head_norm=mea_head_norm),
        kha=KHAConfig(variant=KHAVariant.mlp, targets=["v"]),
    )  # fmt: skip
    model = Transformer(cfg).double()
    model.init_weights()
    attn = model.layers[0].attn
    assert attn.kha_v_into_output == folds
    for w in (attn.kha_v.w_up, attn.kha_v.w_gate, attn.kha_v.w_down):
        w.data += 0.3 * torch.randn_like(w)  # learnt, non-identity matrices
    x, rope = torch.randn(2, 7, 32, dtype=torch.float64), model.rope(7)
    rope = tuple(r.double() for r in rope)
    params = [p for _, p in attn.named_parameters()]
    out = attn(x, rope)
    grads = torch.autograd.grad(out.square().sum(), params)
    attn.kha_v_into_output = False  # the reference: the whole MLP on V, then o_proj
    ref = attn(x, rope)
    grads_ref = torch.autograd.grad(ref.square().sum(), params)
    torch.testing.assert_close(out, ref)
    for (name, _), a, b in zip(attn.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(a, b, msg=name)
