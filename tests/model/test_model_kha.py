"""Knocking-heads attention: the paper's equations, identity at init, learning, absorption."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kha_train.config import KHAVariant
from kha_train.model import build_attention
from kha_train.model.kha import (
    KHA,
    KHAMLP,
    NO_KHA,
    KHAGate,
    KHALinear,
    build_kha,
    drift_from_init,
    qkv_transforms,
)
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


# kind -> (class, d x d matrices per target, activation bytes per value): the numbers flops.py
# used before the KHA objects counted themselves.
KINDS = {"linear": (KHALinear, 1, 2), "mlp": (KHAMLP, 3, 8), "gate": (KHAGate, 1, 4)}


def _learnt(kind: str, d: int) -> KHA:
    """A KHA module of ``kind`` far from its identity init."""
    kha = build_kha(KHAVariant(kind), d)
    assert isinstance(kha, KINDS[kind][0])
    kha.reset_parameters()
    with torch.no_grad():
        for p in kha.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return kha


@pytest.mark.parametrize("output_folded", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_kha_folds_equal_applying_it(kind, output_folded) -> None:
    """The interface attention uses: T's first part folded into the projection W, the rest on
    the heads, and (output_folded) its last part folded into W^O past a map that is linear in
    the values, as attention is: the same outputs and gradients as T on the activations."""
    torch.manual_seed(0)
    B, T, heads, d, D = 2, 5, 3, 4, 6
    kha = _learnt(kind, d)
    x = torch.randn(B, T, D)
    w = torch.randn(heads * d, D, requires_grad=True)
    w_o = torch.randn(D, heads * d, requires_grad=True)
    mix = torch.randn(T, T).softmax(-1)  # attention weights: linear in v, shared by features

    def attend(v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ts,bshd->bthd", mix, v).reshape(B, T, heads * d)

    ref = attend(kha((x @ w.T).view(B, T, heads, d))) @ w_o.T
    h = F.linear(x, kha.fold_into_projection(w)).view(B, T, heads, d)
    h = kha.on_activations(h, output_folded=output_folded)
    out = F.linear(attend(h), kha.fold_into_output(w_o) if output_folded else w_o)
    torch.testing.assert_close(out, ref)
    params = [w, w_o, *kha.parameters()]
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_kha_absorb_equals_unabsorbed(kind) -> None:
    """In place and exact where T is linear (KHA-Linear), untouched otherwise: into a block of
    rows of every head (MLA's layout: the second d of 2d rows), and into W^O's columns."""
    torch.manual_seed(1)
    B, T, heads, d, D = 2, 5, 3, 4, 6
    kha = _learnt(kind, d)
    linear = kind == "linear"
    x = torch.randn(B, T, D)
    w = torch.randn(heads * 2 * d, D)
    absorbed = w.clone()
    assert kha.absorb_into_rows(absorbed, rows=2 * d, first=d) == linear
    y = (x @ w.T).view(B, T, heads, 2 * d)
    y_abs = (x @ absorbed.T).view(B, T, heads, 2 * d)
    assert torch.equal(y_abs[..., :d], y[..., :d])  # the other rows are left alone
    torch.testing.assert_close(y_abs[..., d:], kha(y[..., d:]) if linear else y[..., d:])
    o = torch.randn(B, T, heads, d)
    w_o = torch.randn(D, heads * d)
    absorbed = w_o.clone()
    assert kha.absorb_into_output(absorbed) == linear
    ref = (kha(o) if linear else o).reshape(B, T, -1) @ w_o.T
    torch.testing.assert_close(o.reshape(B, T, -1) @ absorbed.T, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_kha_counts_itself(kind) -> None:
    """Parameters, FLOPs beyond 6N (each matrix reused by every head but one) and activation
    bytes per target, as flops.py counted them from the variant name."""
    _, matrices, bytes_per_value = KINDS[kind]
    d = 128
    with torch.device("meta"):
        kha = build_kha(KHAVariant(kind), d)
    assert sum(p.numel() for p in kha.parameters()) == matrices * d * d
    for heads in (1, 4, 32):
        assert kha.flops_per_token(heads) == 6 * matrices * d * d * (heads - 1)
        assert kha.activation_bytes_per_token(heads * d) == bytes_per_value * heads * d
    assert kha.folds_into_output == (kind == "mlp")


def test_no_kha_is_the_identity(tiny_cfg) -> None:
    """A target without KHA has no module (no state-dict keys); NO_KHA stands in for it."""
    assert build_kha(KHAVariant.none, 8) is None
    attn = build_attention(tiny_cfg(kha="mlp", targets=("v",)))
    assert attn.kha_q is None and not any("kha_q" in k for k in attn.state_dict())
    assert qkv_transforms(attn) == (NO_KHA, NO_KHA, attn.kha_v)
    x, w = torch.randn(2, 3, 4, 8), torch.randn(32, 16)
    assert NO_KHA(x) is x and NO_KHA.on_activations(x, output_folded=True) is x
    assert NO_KHA.fold_into_projection(w) is w and NO_KHA.fold_into_output(w) is w
    assert not NO_KHA.absorb_into_rows(w, rows=8) and not NO_KHA.absorb_into_output(w)
    assert NO_KHA.flops_per_token(32) == 0 == NO_KHA.activation_bytes_per_token(4096)
    assert not list(NO_KHA.parameters()) and not NO_KHA.folds_into_output


def test_drift_from_init_is_zero_at_init_and_the_relative_move_after() -> None:
    """||W - W_0||_F / ||I||_F averaged over the matrices: W_0 = I, or 0 for the gate."""
    mlp = KHAMLP(4)
    mlp.reset_parameters()
    weights = dict(mlp.named_parameters())
    assert drift_from_init(mlp, weights).item() == 0.0
    with torch.no_grad():
        mlp.w_up.mul_(0.5)  # ||0.5 I - I|| / ||I|| = 0.5
        mlp.w_gate.fill_(1.0)  # ||ones(4, 4)|| / ||I|| = 4 / 2 = 2
    drift = drift_from_init(mlp, dict(mlp.named_parameters())).item()
    assert drift == pytest.approx((0.5 + 2 + 0) / 3)
    assert drift_from_init(NO_KHA, {}).item() == 0.0
