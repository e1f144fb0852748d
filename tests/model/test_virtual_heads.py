"""MEA virtual heads: SVD of the K/V projections into fewer cached heads plus HLC."""

from __future__ import annotations

import pytest
import torch

from kha_train.config import MEAConfig
from kha_train.model.flops import kv_cache_elems_per_token_per_layer
from kha_train.tools.virtual_heads import (
    VirtualHeadsError,
    convert_to_virtual_heads,
    head_spectrum,
    head_weights,
    kept_share,
)


def _randomise_attention(model, scale: float = 0.3) -> None:
    """Move KHA, HLC and the head norm away from their identity inits."""
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in (".kha_", ".hlc_", "head_norm")):
                p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize(
    "source",
    [
        dict(kha="mlp"),  # GQA + a nonlinear KHA-MLP after the HLC, QK-norm on
        dict(kha="linear", targets=("q", "k", "v"), num_kv_heads=4),  # MHA
        dict(kha="mlp", attention="mea"),  # MEA with head norm
    ],
)
def test_full_rank_conversion_is_exact(tiny_cfg, build_model, source) -> None:
    m = build_model(tiny_cfg(**source))
    _randomise_attention(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rng = torch.get_rng_state()
    h = m.cfg.num_kv_heads
    new = convert_to_virtual_heads(m, h)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # source untouched
    assert new.cfg.attention == "mea" and new.cfg.mea.cached_kv_heads == h
    assert new.cfg.mea.head_norm == (source.get("attention") == "mea")
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(new(ids), m(ids), rtol=1e-4, atol=1e-5)


def test_fewer_heads_is_the_best_low_rank_approximation(tiny_cfg, build_model) -> None:
    m = build_model(tiny_cfg(moe=False, num_kv_heads=4))
    errors = []
    for r in (1, 2, 3, 4):
        new = convert_to_virtual_heads(m, r)
        assert kv_cache_elems_per_token_per_layer(new.cfg) == 2 * r * 8
        err = 0.0
        for old_blk, new_blk in zip(m.layers, new.layers, strict=True):
            assert new_blk.attn.k_proj.weight.shape == (r * 8, 32)
            assert new_blk.attn.hlc_v.shape == (r, 4)
            for t in ("k", "v"):
                diff = head_weights(new_blk.attn, t) - head_weights(old_blk.attn, t)
                s = head_spectrum(old_blk.attn, t)
                # Eckart-Young: the error is exactly the discarded singular values.
                torch.testing.assert_close(diff.norm(), s[r:].norm(), rtol=1e-5, atol=1e-6)
                err += diff.norm().item()
        errors.append(err)
    assert errors[0] > errors[1] > errors[2] > errors[3] == pytest.approx(0.0, abs=1e-5)


def test_low_rank_heads_convert_exactly(tiny_cfg, build_model) -> None:
    """KV heads that are multiples of one head (rank 1 over the head axis) fit in one cached
    head: the converted model computes the same function with half the KV cache."""
    m = build_model(tiny_cfg(kha="mlp"))
    with torch.no_grad():
        for blk in m.layers:
            for proj in (blk.attn.k_proj, blk.attn.v_proj):
                w = proj.weight.view(2, 8, 32)
                w[1] = -0.5 * w[0]
    new = convert_to_virtual_heads(m, 1)
    assert (
        kv_cache_elems_per_token_per_layer(new.cfg)
        == kv_cache_elems_per_token_per_layer(m.cfg) // 2
    )
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(new(ids), m(ids), rtol=1e-4, atol=1e-5)


def test_converted_model_trains(tiny_cfg, build_model) -> None:
    new = convert_to_virtual_heads(build_model(tiny_cfg(attention="mea")), 1)
    ids = torch.randint(0, 97, (2, 12))
    new(ids, ids).backward()
    assert all(p.grad is not None for p in new.parameters())


@pytest.mark.parametrize(
    "source,n,message",
    [
        (dict(attention="gta"), 1, "not model.attention=gta"),
        (dict(attention="talking_heads"), 1, "not model.attention=talking_heads"),
        (dict(), 0, r"in \[1, model.num_kv_heads=2\], got 0"),
        (dict(), 3, r"in \[1, model.num_kv_heads=2\], got 3"),
        (dict(attention="mea", mea=MEAConfig(cached_kv_heads=1)), 2, None),  # 1 -> 2 is fine
    ],
)
def test_bad_requests(tiny_cfg, build_model, source, n, message) -> None:
    m = build_model(tiny_cfg(**source))
    if message is None:
        assert convert_to_virtual_heads(m, n).cfg.mea.cached_kv_heads == n
        return
    with pytest.raises(VirtualHeadsError, match=message):
        convert_to_virtual_heads(m, n)


def test_kept_share_measures_what_fewer_heads_keep(tiny_cfg, build_model) -> None:
    """All of K/V at r = h; all of it at r = 1 when the heads are copies of one; a fraction of
    it, below 1, when they are independent."""
    m = build_model(tiny_cfg(moe=False, num_kv_heads=4))
    attn = m.layers[0].attn
    assert kept_share(attn, "k", 4) == pytest.approx(1.0, abs=1e-12)
    shares = [kept_share(attn, "v", r) for r in (1, 2, 3, 4)]
    assert 0 < shares[0] < shares[1] < shares[2] < shares[3] == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():
        w = attn.k_proj.weight.view(4, 8, 32)
        w.copy_(w[:1].expand_as(w) * torch.tensor([1.0, -2.0, 0.5, 3.0]).view(4, 1, 1))
    assert kept_share(attn, "k", 1) == pytest.approx(1.0, abs=1e-12)
