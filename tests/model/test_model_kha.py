"""Knocking-heads attention: the paper's equations, identity at init, learning, absorption."""

from __future__ import annotations

import pytest
import torch

from kha_train.model.kha import KHAMLP, KHAGate, KHALinear
from kha_train.tools.absorb import absorb_kha

VARIANTS = [
    ("linear", ("v",)),
    ("linear", ("q", "k", "v")),
    ("linear", ("q",)),
    ("mlp", ("v",)),
    ("mlp", ("q", "k", "v")),
    ("gate", ("v",)),
]


def _kha_params(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if ".kha_" in n}


def _train(model, steps: int, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    torch.manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, model.cfg.vocab_size, (4, 12))
        model(ids, torch.roll(ids, -1, dims=1)).backward()
        opt.step()
        opt.zero_grad()


def test_equations_on_heads() -> None:
    """Each head is transformed by the same matrices (eqs. 5-9), done as one batched matmul."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4)  # (B, T, heads, d_head)
    lin, mlp, gate = KHALinear(4), KHAMLP(4), KHAGate(4)
    for p in [*lin.parameters(), *mlp.parameters(), *gate.parameters()]:
        torch.nn.init.normal_(p)
    for i in range(3):
        xi = x[:, :, i]  # head i: (B, T, d_head)
        torch.testing.assert_close(lin(x)[:, :, i], xi @ lin.weight)
        up, g = xi @ mlp.w_up, torch.sigmoid(xi @ mlp.w_gate)
        torch.testing.assert_close(mlp(x)[:, :, i], 2 * (up * g) @ mlp.w_down)
        torch.testing.assert_close(gate(x)[:, :, i], xi * 2 * torch.sigmoid(xi @ gate.w_gate))


@pytest.mark.parametrize("variant,targets", VARIANTS)
def test_identity_at_init_then_learns(tiny_cfg, build_model, variant, targets) -> None:
    base = build_model(tiny_cfg(kha="none"))
    kha = build_model(tiny_cfg(kha=variant, targets=targets))
    missing, unexpected = kha.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".kha_" in k for k in missing)
    ids = torch.randint(0, 97, (2, 12))
    # Exactly the model without KHA (same other weights), not merely close.
    assert torch.equal(kha(ids), base(ids))
    before = {n: p.detach().clone() for n, p in _kha_params(kha).items()}
    _train(kha, steps=3)
    assert all(not torch.equal(before[n], p) for n, p in _kha_params(kha).items())
    kha.load_state_dict(
        {**base.state_dict(), **{n: p for n, p in kha.state_dict().items() if ".kha_" in n}}
    )
    assert not torch.allclose(kha(ids), base(ids), atol=1e-4)


def test_kha_placement_before_qk_norm(tiny_cfg, build_model) -> None:
    """T^K sits before the per-head RMSNorm: scaling T^K changes nothing (the norm removes it),
    which would not hold if it acted after the norm."""
    m = build_model(tiny_cfg(kha="linear", targets=("k",)))
    _train(m, steps=2)
    ids = torch.randint(0, 97, (2, 12))
    ref = m(ids)
    with torch.no_grad():
        for blk in m.layers:
            blk.attn.kha_k.weight.mul_(3.0)
    torch.testing.assert_close(m(ids), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("targets", [("v",), ("q", "k", "v"), ("q", "k")])
def test_absorb_linear_matches(tiny_cfg, build_model, targets) -> None:
    m = build_model(tiny_cfg(kha="linear", targets=targets))
    _train(m, steps=4, lr=3e-2)  # T far from the identity
    ids = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        ref = m(ids)
        out = absorb_kha(m)(ids)
    assert not _kha_params(m) and not any(".kha_" in k for k in m.state_dict())
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_absorb_leaves_mlp_in_place(tiny_cfg, build_model) -> None:
    m = build_model(tiny_cfg(kha="mlp", targets=("v",)))
    ids = torch.randint(0, 97, (2, 8))
    ref = m(ids)
    absorb_kha(m)
    assert all(isinstance(b.attn.kha_v, KHAMLP) for b in m.layers)
    assert torch.equal(m(ids), ref)
