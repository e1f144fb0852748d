"""MoE layer: dispatch against a per-token reference, grouped GEMM against the per-expert loop,
selection bias, load balancing, and count bookkeeping (checkpointing, eval)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kha_train.config import Balancing, MoEConfig
from kha_train.model import collect_expert_counts, load_stats, moe_layers, update_expert_bias
from kha_train.model.moe import MoELayer, bias_delta

D, E, K, FF = 16, 6, 2, 8


def make_layer(seed: int = 0, **kw) -> MoELayer:
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=K, expert_ffn_size=FF, **kw))
    torch.manual_seed(seed)
    layer.reset_parameters(std=0.3, out_std=0.3)
    layer.train()
    return layer


def naive_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token, slot by slot: the definition the fast path must reproduce."""
    r, ex = layer.router, layer.experts
    out = []
    for tok in x.reshape(-1, D):  # (D,)
        logits = r.weight @ tok
        scores = logits.softmax(-1) if r.score_func == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores + r.expert_bias, K).indices
        g = scores[chosen]
        if r.norm_topk:
            g = g / g.sum()
        y = torch.zeros(D)
        for e, w in zip(chosen.tolist(), g):
            gate, up = (ex.w_gate_up_E2FD[e] @ tok).chunk(2)
            h = F.silu(gate) * up
            y = y + w * (ex.w_down_EDF[e] @ h)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize(
    "score_func,norm", [("softmax", True), ("sigmoid", True), ("softmax", False)]
)
def test_dispatch_matches_per_token_reference(score_func, norm) -> None:
    layer = make_layer(score_func=score_func, norm_topk_prob=norm)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, E))  # bias in the selection
    x = torch.randn(3, 7, D, requires_grad=True)
    out = layer(x)
    out.pow(2).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    ref = naive_moe(layer, x)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_per_expert_loop(dtype) -> None:
    layer = make_layer().to(dtype)
    counts = torch.tensor([5, 0, 3, 9, 1, 0], dtype=torch.int32)  # empty experts included
    x = torch.randn(int(counts.sum()), D, dtype=dtype, requires_grad=True)
    out = layer.experts(x, counts)
    g = torch.randn_like(out)
    out.backward(g)
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.experts.parameters()]
    x.grad = None
    layer.zero_grad()
    ref = layer.experts.forward_loop(x, counts)
    ref.backward(g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads, [x.grad] + [p.grad for p in layer.experts.parameters()]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_experts_run_on_the_cpu(dtype) -> None:
    """parallel.compile=true on the CPU: compile's shape rules for torch._grouped_mm take bf16
    only, so fp32 falls back to the loop there (eager CPU runs fp32 grouped GEMMs), and the
    probe of what eager supports runs outside the graph. Both match the eager layer."""
    torch._dynamo.reset()
    layer = make_layer().to(dtype)
    counts = torch.tensor([5, 0, 3, 9, 1, 0], dtype=torch.int32)
    x = torch.randn(int(counts.sum()), D, dtype=dtype)
    compiled = torch.compile(layer.experts)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(compiled(x, counts), layer.experts(x, counts), **tol)


def test_bias_changes_selection_not_gate_weights() -> None:
    layer = make_layer()
    x = torch.randn(40, D)
    ids0, _, scores = layer.router(x)
    with torch.no_grad():
        layer.router.expert_bias[3] = 10.0  # expert 3 now wins every selection
    ids1, gates1, scores1 = layer.router(x)
    assert (ids1 == 3).any(dim=-1).all() and not (ids0 == 3).any(dim=-1).all()
    torch.testing.assert_close(scores1, scores)  # the bias is not in the scores
    # Gate weights are the unbiased scores of the chosen experts (renormalised).
    expect = scores.gather(-1, ids1)
    torch.testing.assert_close(gates1, expect / expect.sum(-1, keepdim=True))
    # Gradients flow to the router weights through the gate weights.
    (gates1 * torch.randn_like(gates1)).sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("rule", ["loss_free_sign", "loss_free_rms"])
def test_skewed_router_becomes_balanced(rule) -> None:
    layer = make_layer(balancing=rule, bias_update_rate=1e-2, score_func="sigmoid")
    torch.manual_seed(1)
    x = torch.randn(512, D) + 0.5  # inputs share a direction the router can favour
    with torch.no_grad():
        layer.router.weight[0] += 0.3  # experts 0 and 1 win almost every token
        layer.router.weight[1] += 0.2
    first = None
    for _ in range(300):
        layer(x.unsqueeze(0))
        counts = collect_expert_counts(layer)
        first = load_stats(counts)["max_violation"].item() if first is None else first
        update_expert_bias(layer, counts)
    final = load_stats(counts)["max_violation"].item()
    assert first > 1.0, "the router should start out skewed"
    assert final < 0.25, f"max violation {first:.2f} -> {final:.2f}"


def test_counts_not_doubled_under_activation_checkpointing(tiny_cfg, build_model) -> None:
    cfg = tiny_cfg()
    m = build_model(cfg)
    block = m.layers[1]
    assert block.is_moe
    x = torch.randn(2, 5, cfg.hidden_size, requires_grad=True)
    rope = m.rope(5)
    out = checkpoint(block, x, rope, use_reentrant=False)
    out.sum().backward()  # re-runs the block's forward inside backward
    counts = collect_expert_counts(block)
    assert counts.sum().item() == 2 * 5 * cfg.moe.top_k
    # A plain forward + backward counts the same.
    block.ffn.expert_counts.zero_()
    block(x, rope).sum().backward()
    torch.testing.assert_close(collect_expert_counts(block), counts)


def test_counts_only_in_training_forwards(tiny_cfg, build_model) -> None:
    m = build_model(tiny_cfg())
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        m(ids, ids)
    m.eval()
    m(ids)
    assert collect_expert_counts(m).sum().item() == 0
    m.train()
    m(ids, ids)
    m(ids, ids)  # two micro-batches accumulate
    counts = collect_expert_counts(m)
    assert counts.shape == (2, 4) and (counts.sum(-1) == 2 * 12 * 2).all()
    update_expert_bias(m, counts)
    assert collect_expert_counts(m).sum().item() == 0


def test_bias_is_checkpointed_counts_are_not(tiny_cfg, build_model) -> None:
    m = build_model(tiny_cfg())
    keys = m.state_dict().keys()
    assert {"layers.1.ffn.router.expert_bias", "layers.2.ffn.router.expert_bias"} <= keys
    assert not any("expert_counts" in k for k in keys)
    assert len(moe_layers(m)) == 2


@pytest.mark.parametrize("rule", ["none", "aux_loss"])
def test_update_is_noop_without_loss_free_rule(tiny_cfg, build_model, rule) -> None:
    m = build_model(tiny_cfg(moe_kw=dict(balancing=rule)))
    m(torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 6)))
    counts = collect_expert_counts(m)
    assert counts.sum() > 0
    update_expert_bias(m, counts)
    assert all(torch.equal(layer.expert_bias, torch.zeros(4)) for layer in moe_layers(m))
    assert collect_expert_counts(m).sum() == 0


def test_bias_rules() -> None:
    counts = torch.tensor([6.0, 2.0, 0.0, 0.0])  # F = [.75, .25, 0, 0], Q = .25
    sign = bias_delta(counts, Balancing.loss_free_sign, 0.1)
    torch.testing.assert_close(sign, torch.tensor([-0.1, 0.0, 0.1, 0.1]))
    err = torch.tensor([0.5, 0.0, -0.25, -0.25])
    rms = bias_delta(counts, Balancing.loss_free_rms, 0.1)
    torch.testing.assert_close(rms, -0.1 * err / err.square().mean().sqrt())
    assert bias_delta(torch.zeros(4), Balancing.loss_free_rms, 0.1).abs().sum() == 0  # no tokens
    assert bias_delta(torch.ones(4), Balancing.loss_free_rms, 0.1).abs().sum() == 0  # balanced


def test_load_stats() -> None:
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    s = load_stats(counts)
    torch.testing.assert_close(s["max_violation"], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(s["min_share"], torch.tensor([0.0, 0.25]))
    torch.testing.assert_close(s["max_share"], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(s["dead_experts"], torch.tensor([2.0, 0.0]))


def test_aux_loss_is_added_and_trains_router(tiny_cfg, build_model) -> None:
    ids = torch.randint(0, 97, (2, 8))
    plain = build_model(tiny_cfg())
    aux = build_model(tiny_cfg(moe_kw=dict(balancing="aux_loss", aux_loss_coef=0.5)))
    ce = plain(ids, ids)
    loss = aux(ids, ids)
    # Switch aux loss: coef * E * sum f_i P_i >= coef per layer (equality when balanced).
    assert aux.last_aux_loss.item() >= 2 * 0.5 - 1e-6
    torch.testing.assert_close(loss, ce + aux.last_aux_loss)
    loss.backward()
    assert aux.layers[1].ffn.router.weight.grad.abs().sum() > 0


def test_shared_experts_add_a_dense_path() -> None:
    layer = make_layer(num_shared_experts=2)
    x = torch.randn(1, 5, D)
    routed = make_layer()
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if "shared" not in k})
    torch.testing.assert_close(layer(x), routed(x) + layer.shared_experts(x))


def test_bf16_router_logits_are_the_fp32_product_with_bf16_gradients() -> None:
    """bf16 operands (FSDP mixed precision): fp32 logits equal to the fp32 product of the same
    values; gradients as a bf16 matmul of the rounded upstream gradient would give."""
    from kha_train.model.moe.router import mm_fp32_out, router_logits

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=g).bfloat16().requires_grad_()
    w = torch.randn(E, D, generator=g).bfloat16().requires_grad_()
    logits = router_logits(x, w)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ w.float().T, rtol=1e-6, atol=1e-6)
    up = torch.randn(64, E, generator=g)
    logits.backward(up)
    assert x.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, up.bfloat16() @ w.detach())
    torch.testing.assert_close(w.grad, up.bfloat16().T @ x.detach())
    # fp32 weights keep the plain fp32 path, also under autocast.
    w32 = w.detach().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router_logits(x.detach().float(), w32).dtype == torch.float32
    torch.library.opcheck(mm_fp32_out, (x.detach(), w.detach().T))


def test_weights_of_the_old_expert_layout_get_a_conversion_hint() -> None:
    from kha_train.training.checkpoint_checks import shape_mismatches

    ours = {"layers.1.ffn.experts.w_gate_up_E2FD": (E, 2 * FF, D)}
    old = {
        "layers.1.ffn.experts.w_gate_EFD": (E, FF, D),
        "layers.1.ffn.experts.w_up_EFD": (E, FF, D),
    }
    lines = shape_mismatches(old, ours, "checkpoint")
    assert any("w_gate_up_E2FD: missing from the checkpoint" in line for line in lines)
    assert "concatenate w_gate_EFD and w_up_EFD along dim 1" in lines[-1]
    assert not any("concatenate" in line for line in shape_mismatches(ours, ours, "checkpoint"))
