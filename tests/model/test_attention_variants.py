"""Attention variants (GQA/MQA, GTA, MLA, MEA, talking heads): causality, gradient flow, KHA
identity at init, absorption, and each variant against its equations (docs/model.md)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from model_helpers import assert_causal, assert_equal_up_to_rounding

from kha_train.config import KHAConfig, MEAConfig, MLAConfig, ModelConfig
from kha_train.config_checks import validate_model
from kha_train.model import Transformer
from kha_train.model.attention import Attention
from kha_train.model.kha import KHALinear
from kha_train.model.rope import RotaryEmbedding, apply_rope
from kha_train.tools.absorb import absorb_kha

MLA_TINY = MLAConfig(kv_lora_rank=12, q_lora_rank=10, rope_head_dim=4)

# name -> model overrides of the tiny config (4 query heads, 2 KV heads of 8, hidden 32).
VARIANTS: dict[str, dict[str, Any]] = {
    "gqa": dict(),
    "mqa": dict(num_kv_heads=1),
    "gta": dict(attention="gta"),
    "mla": dict(attention="mla", qk_norm=False, mla=MLA_TINY),
    "mla_no_q_latent": dict(
        attention="mla",
        qk_norm=False,
        num_kv_heads=4,
        mla=MLAConfig(kv_lora_rank=12, q_lora_rank=0, rope_head_dim=4),
    ),
    "mea": dict(attention="mea"),
    "mea_virtual": dict(attention="mea", mea=MEAConfig(cached_kv_heads=1)),
    "talking_heads": dict(attention="talking_heads"),
}


def _kha_for(name: str) -> str:
    """The KHA the paper pairs with each variant (Table 3): MLP, except Linear for MLA."""
    return "linear" if name.startswith("mla") else "mlp"


def _cfg(tiny_cfg, name: str, **kw: Any) -> ModelConfig:
    cfg = tiny_cfg(**{**VARIANTS[name], **kw})
    assert validate_model(cfg) == []
    return cfg


def _x_and_rope(model: Transformer, B: int = 2, T: int = 9):
    torch.manual_seed(5)
    return torch.randn(B, T, model.cfg.hidden_size), model.rope(T)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(tiny_cfg, build_model, name) -> None:
    cfg = _cfg(tiny_cfg, name, kha=_kha_for(name), targets=("q", "k", "v"))
    m = build_model(cfg)
    # Up to rounding, not bit for bit: other later tokens route other tokens to each expert, and
    # the expert matmuls at other row counts may sum in another order (model_helpers).
    assert_causal(m, torch.randint(0, cfg.vocab_size, (2, 12)), (0, 6), cfg.vocab_size)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_parameter_gets_a_gradient(tiny_cfg, build_model, name) -> None:
    cfg = _cfg(tiny_cfg, name, moe=False, kha=_kha_for(name), targets=("q", "k", "v"))
    m = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    m(ids, torch.roll(ids, -1, dims=1)).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize(
    "name,kha",
    [(n, k) for n in VARIANTS for k in ("linear", "mlp") if k == "linear" or n[:3] != "mla"],
)
def test_kha_is_the_identity_at_init(tiny_cfg, build_model, name, kha) -> None:
    """With KHA the variant computes exactly what it computes without (same other weights)."""
    targets = ("q", "k", "v") if kha == "linear" else ("v",)
    base = build_model(_cfg(tiny_cfg, name))
    with_kha = build_model(_cfg(tiny_cfg, name, kha=kha, targets=targets))
    missing, unexpected = with_kha.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".kha_" in k for k in missing)
    ids = torch.randint(0, 97, (2, 11))
    assert torch.equal(with_kha(ids), base(ids))


def _perturb_kha(model: Transformer) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, KHALinear):
                mod.weight.add_(0.3 * torch.randn_like(mod.weight))


# The KHA-Linear modules absorb_kha must leave in place, per variant.
KEPT_AFTER_ABSORB = {"gta": {"kha_k"}}


@pytest.mark.parametrize("name", VARIANTS)
def test_absorb_kha_linear(tiny_cfg, build_model, name) -> None:
    m = build_model(_cfg(tiny_cfg, name, kha="linear", targets=("q", "k", "v")))
    _perturb_kha(m)  # T far from the identity
    if name.startswith("mea"):  # HLC away from its init too
        with torch.no_grad():
            for blk in m.layers:
                blk.attn.hlc_k.add_(0.3 * torch.randn_like(blk.attn.hlc_k))
                blk.attn.hlc_v.add_(0.3 * torch.randn_like(blk.attn.hlc_v))
    ids = torch.randint(0, 97, (3, 12))
    with torch.no_grad():
        ref = m(ids)
        out = absorb_kha(m)(ids)
    kept = KEPT_AFTER_ABSORB.get(name, set())
    for blk in m.layers:
        for t in ("q", "k", "v"):
            assert (getattr(blk.attn, f"kha_{t}") is not None) == (f"kha_{t}" in kept), t
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_meta_build_then_init_matches_direct_build(tiny_cfg, build_model, name) -> None:
    """init_weights covers every parameter of the variant (the trainer's meta-device path)."""
    cfg = _cfg(tiny_cfg, name, kha=_kha_for(name), targets=("v",))
    direct = build_model(cfg, seed=4)
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    torch.manual_seed(4)
    meta.init_weights()
    for (k, a), b in zip(direct.state_dict().items(), meta.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", VARIANTS)
def test_bf16_autocast(tiny_cfg, build_model, name) -> None:
    m = build_model(_cfg(tiny_cfg, name, kha=_kha_for(name)))
    ids = torch.randint(0, 97, (2, 16))
    ref = m(ids, ids).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(ids, ids)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref) < 0.05
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


# ----------------------------------------------------------------------------------------------
# Each variant against its equations
# ----------------------------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal reference attention of q [B, T, H, dq], k [B, T, H, dq], v [B, T, H, dv]."""
    s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    T = q.shape[1]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)


def test_gta_equations(tiny_cfg, build_model) -> None:
    """k_i = [kv_i[:d/2], k_r] with one RoPE head k_r for all, v_i = kv_i, RoPE on last halves."""
    m = build_model(_cfg(tiny_cfg, "gta", qk_norm=False))
    attn = m.layers[0].attn
    x, rope = _x_and_rope(m)
    B, T, _ = x.shape
    d, r = 8, 4
    q = (x @ attn.q_proj.weight.T).view(B, T, 4, d)
    kv = (x @ attn.kv_proj.weight.T).view(B, T, 2, d)
    k_r = x @ attn.k_rope_proj.weight.T  # (B, T, r)
    assert attn.k_rope_proj.weight.shape == (r, 32) and attn.kv_cache_elems == 2 * d + r
    table = RotaryEmbedding(r, 10000.0)
    table.reset_parameters()
    cos, sin = table(T)
    heads = []
    for i in range(4):
        g = i // 2  # the KV head of query head i
        qi = torch.cat(
            (q[:, :, i, : d - r], apply_rope(q[:, :, i, None, d - r :], cos, sin)[:, :, 0]), -1
        )
        ki = torch.cat((kv[:, :, g, : d - r], apply_rope(k_r[:, :, None], cos, sin)[:, :, 0]), -1)
        heads.append(_sdpa(qi[:, :, None], ki[:, :, None], kv[:, :, g, None])[:, :, 0])
    ref = torch.stack(heads, dim=2).reshape(B, T, 4 * d) @ attn.o_proj.weight.T
    torch.testing.assert_close(attn(x, rope), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mla", "mla_no_q_latent"])
def test_mla_from_its_cache_after_absorption(tiny_cfg, build_model, name) -> None:
    """MLA with KHA-Linear, absorbed, then computed the inference way from the per-token cache
    alone (c_kv and RoPE(k_r): 12 + 4 values), W^UK folded into the queries and W^UV applied
    after the attention, equals the training forward."""
    m = build_model(_cfg(tiny_cfg, name, kha="linear", targets=("q", "k", "v")))
    _perturb_kha(m)
    attn = m.layers[1].attn
    x, rope = _x_and_rope(m)
    with torch.no_grad():
        ref = attn(x, rope)
        absorb_kha(m)
        B, T, _ = x.shape
        H, Hkv, n, r, c = attn.num_heads, attn.num_kv_heads, 8, 4, 12
        c_q = x if attn.q_down is None else attn.q_latent_norm(attn.q_down(x))
        q_n, q_r = attn.q_up(c_q).view(B, T, H, n + r).split((n, r), -1)
        c_kv, k_r = attn.kv_down(x).split((c, r), -1)
        cache = torch.cat(
            (attn.kv_latent_norm(c_kv), apply_rope(k_r[:, :, None], *rope)[:, :, 0]), -1
        )
        assert cache.shape[-1] == attn.kv_cache_elems == 16
        w_up = attn.kv_up.weight.view(Hkv, 2 * n, c)  # per KV head: W^UK rows, then W^UV rows
        group = torch.arange(H) // (H // Hkv)
        w_uk, w_uv = w_up[group, :n], w_up[group, n:]  # (H, n, c) each
        q_lat = torch.einsum("bthn,hnc->bthc", q_n, w_uk)  # queries in the latent space
        q_full = torch.cat((q_lat, apply_rope(q_r, *rope)), -1)  # (B, T, H, c + r)
        k_full = cache[:, :, None].expand(B, T, H, c + r)
        s = torch.einsum("bthd,bshd->bhts", q_full, k_full) / math.sqrt(n + r)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        o_lat = torch.einsum("bhts,bsc->bthc", s.softmax(-1), cache[..., :c])
        o = torch.einsum("bthc,hnc->bthn", o_lat, w_uv)
        out = attn.o_proj(o.reshape(B, T, H * n))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_mea_hlc_at_identity_init_equals_plain_attention(tiny_cfg, build_model) -> None:
    """MEA with head norm off and HLC at its identity init is the GQA model, exactly."""
    gqa = build_model(_cfg(tiny_cfg, "gqa", kha="mlp"))
    mea = build_model(_cfg(tiny_cfg, "mea", kha="mlp", mea=MEAConfig(head_norm=False)))
    missing, unexpected = mea.load_state_dict(gqa.state_dict(), strict=False)
    assert not unexpected and sorted({k.split(".")[-1] for k in missing}) == ["hlc_k", "hlc_v"]
    assert torch.equal(mea.layers[0].attn.hlc_k, torch.eye(2))
    ids = torch.randint(0, 97, (2, 11))
    assert torch.equal(mea(ids), gqa(ids))


def test_mea_virtual_heads_at_init_are_gqa_with_the_cached_heads(tiny_cfg, build_model) -> None:
    """h_c = 1 cached head expanded to 2 by the initial HLC (replication) = MQA."""
    mqa = build_model(_cfg(tiny_cfg, "mqa"))
    mea = build_model(_cfg(tiny_cfg, "mea", mea=MEAConfig(cached_kv_heads=1, head_norm=False)))
    mea.load_state_dict(mqa.state_dict(), strict=False)
    assert torch.equal(mea.layers[0].attn.hlc_v, torch.ones(1, 2))
    ids = torch.randint(0, 97, (2, 11))
    # Equal values by other kernels (attention over 2 equal KV heads, not 1): up to rounding.
    assert_equal_up_to_rounding(mea(ids), mqa(ids))


def test_mea_hlc_is_a_head_mix_of_the_projection(tiny_cfg, build_model) -> None:
    """HLC acts on the projection outputs, before KHA and the QK-norm: MEA with HLC W and
    projection rows W_c equals GQA whose head i has rows sum_j W[j, i] W_c[j] (so SVD can factor
    a trained projection into cached heads exactly at full rank)."""
    mea = build_model(_cfg(tiny_cfg, "mea", kha="mlp", mea=MEAConfig(head_norm=False)))
    gqa = build_model(_cfg(tiny_cfg, "gqa", kha="mlp"))
    torch.manual_seed(9)
    sd = mea.state_dict()
    for i in range(3):
        sd[f"layers.{i}.attn.kha_v.w_gate"] = torch.randn(8, 8)  # a nonlinear KHA-MLP
        for t in ("k", "v"):
            sd[f"layers.{i}.attn.hlc_{t}"] = torch.randn(2, 2)
    mea.load_state_dict(sd)
    for i in range(3):
        for t in ("k", "v"):
            hlc = sd.pop(f"layers.{i}.attn.hlc_{t}")
            w_c = sd[f"layers.{i}.attn.{t}_proj.weight"].view(2, 8, 32)  # (h_c, d, D)
            w = torch.einsum("ji,jdD->idD", hlc, w_c)  # (h, d, D)
            sd[f"layers.{i}.attn.{t}_proj.weight"] = w.reshape(16, 32)
    gqa.load_state_dict(sd)
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(mea(ids), gqa(ids), rtol=1e-5, atol=1e-5)


def test_mea_head_norm(tiny_cfg, build_model) -> None:
    """Every head's output reaches W^O with unit RMS times its weight."""
    m = build_model(_cfg(tiny_cfg, "mea", norm_eps=1e-12))
    attn = m.layers[0].attn
    seen = {}
    attn.o_proj.register_forward_hook(lambda mod, args, out: seen.update(inp=args[0]))
    x, rope = _x_and_rope(m)
    attn(x, rope)
    heads = seen["inp"].view(2, 9, 4, 8)
    torch.testing.assert_close(heads.pow(2).mean(-1), torch.ones(2, 9, 4), rtol=1e-4, atol=1e-4)
    assert attn.head_norm.weight.shape == (4, 8)


def test_talking_heads_equations(tiny_cfg, build_model) -> None:
    """Logits mixed across heads by P_L before the softmax, weights by P_W after (GQA KV)."""
    m = build_model(_cfg(tiny_cfg, "talking_heads"))
    attn = m.layers[0].attn
    torch.manual_seed(2)
    with torch.no_grad():
        attn.logit_mix.copy_(torch.randn(4, 4))
        attn.weight_mix.copy_(torch.randn(4, 4))
    B, T, H, d = 2, 7, 4, 8
    q, k, v = torch.randn(B, T, H, d), torch.randn(B, T, 2, d), torch.randn(B, T, 2, d)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    logits = [q[:, :, h] @ k[:, :, h // 2].transpose(1, 2) / math.sqrt(d) for h in range(H)]
    P_L, P_W = attn.logit_mix.detach(), attn.weight_mix.detach()
    probs = [
        sum(P_L[h, i] * logits[h] for h in range(H)).masked_fill(future, -math.inf).softmax(-1)
        for i in range(H)
    ]
    ref = [sum(P_W[h, i] * probs[h] for h in range(H)) @ v[:, :, i // 2] for i in range(H)]
    with torch.no_grad():
        out = attn._attend(q, k, v)
    torch.testing.assert_close(out, torch.stack(ref, dim=2), rtol=1e-5, atol=1e-5)


def test_talking_heads_at_identity_init_equals_gqa(tiny_cfg, build_model) -> None:
    gqa = build_model(_cfg(tiny_cfg, "gqa", kha="mlp"))
    th = build_model(_cfg(tiny_cfg, "talking_heads", kha="mlp"))
    missing, _ = th.load_state_dict(gqa.state_dict(), strict=False)
    assert sorted({k.split(".")[-1] for k in missing}) == ["logit_mix", "weight_mix"]
    ids = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(th(ids), gqa(ids), rtol=1e-5, atol=1e-5)


def test_gqa_state_dict_keys_unchanged(tiny_cfg, build_model) -> None:
    m = build_model(_cfg(tiny_cfg, "gqa", kha="linear", targets=("q", "k", "v")))
    keys = {k.removeprefix("layers.0.") for k in m.state_dict() if k.startswith("layers.0.attn.")}
    assert keys == {
        f"attn.{n}.weight"
        for n in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "kha_q",
            "kha_k",
            "kha_v",
            "q_norm",
            "k_norm",
        )
    }


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            dict(attention="mla", qk_norm=False, kha=KHAConfig(variant="mlp")),
            "model.kha.variant=mlp with model.attention=mla: MLA only works with KHA-Linear",
        ),
        (
            dict(attention="mla", qk_norm=False, kha=KHAConfig(variant="gate")),
            "set model.kha.variant=linear",
        ),
        (dict(attention="mla"), "model.qk_norm=true with model.attention=mla"),
        (
            dict(attention="mla", qk_norm=False, mla=MLAConfig(rope_head_dim=3)),
            "model.mla.rope_head_dim=3 must be even",
        ),
        (dict(attention="gta", head_dim=6), "model.head_dim=6 must be a multiple of 4"),
        (
            dict(attention="talking_heads", attn_backend="cudnn"),
            "model.attn_backend=cudnn with model.attention=talking_heads",
        ),
        (
            dict(attention="mea", mea=MEAConfig(cached_kv_heads=3)),
            "model.mea.cached_kv_heads=3 must be in [0, model.num_kv_heads=2]",
        ),
        (
            dict(mea=MEAConfig(cached_kv_heads=1)),
            "model.mea.cached_kv_heads=1 is set but model.attention=gqa",
        ),
    ],
)
def test_config_errors(overrides, message) -> None:
    cfg = ModelConfig(
        **{**dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8), **overrides}
    )
    errs = validate_model(cfg)
    assert any(message in e for e in errs), errs


def test_config_error_reaches_the_cli(tmp_path, capsys) -> None:
    from kha_train.cli import main

    path = tmp_path / "mla.yaml"
    path.write_text("data:\n  dataset: d\nmodel:\n  attention: mla\n  kha:\n    variant: mlp\n")
    assert main(["info", str(path), "model.qk_norm=false"]) == 2
    err = capsys.readouterr().err
    assert "MLA only works with KHA-Linear" in err and "model.kha.variant=linear" in err


@pytest.mark.parametrize("cached", [2, 1])
def test_mea_hlc_folded_into_the_weights_equals_hlc_on_the_activations(
    tiny_cfg, build_model, cached
) -> None:
    """Training folds HLC into W^K / W^V; composing the cached heads after the projection (as
    decoding does) is the same function with the same gradients, KHA-Linear and head norm on."""
    cfg = _cfg(tiny_cfg, "mea", kha="linear", targets=("q", "k", "v"),
               mea=MEAConfig(cached_kv_heads=cached))  # fmt: skip
    m = build_model(cfg).double()
    _perturb_kha(m)
    attn = m.layers[0].attn
    torch.manual_seed(3)
    with torch.no_grad():
        attn.hlc_k.add_(0.5 * torch.randn_like(attn.hlc_k))
        attn.hlc_v.add_(0.5 * torch.randn_like(attn.hlc_v))
    x, rope = _x_and_rope(m)
    x = x.double()
    rope = tuple(r.double() for r in rope)

    def unfolded() -> torch.Tensor:
        q, k_c, v_c = Attention.project(attn, x)  # the cached heads, HLC not applied
        q, k, v = attn.knock(q, *attn.compose(k_c, v_c))
        q, k = attn.norm_and_rotate(q, k, rope)
        return attn.project_out(attn.merge_heads(attn._attend(q, k, v)))

    grads = []
    for fn in (lambda: attn(x, rope), unfolded):
        attn.zero_grad()
        out = fn()
        out.pow(2).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (out_a, g_a), (out_b, g_b) = grads
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    assert g_a.keys() == g_b.keys() and {"hlc_k", "hlc_v", "k_proj.weight"} <= g_a.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=1e-9, atol=1e-11, msg=name)
