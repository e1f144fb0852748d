"""The grad norm split by model part (training/grad_parts.py): which part each parameter is,
the split on a real model's gradients, and the spike records that carry it."""

from __future__ import annotations

import io
import math

import pytest
import torch
from test_train_spike_guard import GUARD, NO_VAL, Inject, K
from train_helpers import records, tiny_config, train_here

from kha_train.config import load_config
from kha_train.model.transformer import Transformer
from kha_train.training.grad_parts import GradParts, part_of


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("embed_tokens.weight", "embedding"),
        ("lm_head.weight", "embedding"),
        ("norm.weight", "norms"),
        ("layers.0.attn_norm.weight", "norms"),
        ("layers.0.attn.q_norm.weight", "norms"),
        ("layers.0.attn.kha_v.w_up", "head_mixing"),
        ("layers.3.attn.hlc_k", "head_mixing"),
        ("layers.1.ffn.router.weight", "router"),
        ("layers.1.ffn.experts.w_gate_up_E2FD", "experts"),
        ("layers.0.attn.q_proj.weight", "attention"),
        ("layers.0.ffn.gate_proj.weight", "ffn"),
        ("layers.1.ffn.shared_expert.up_proj.weight", "ffn"),
        # torch.compile's and activation checkpointing's wrappers change nothing
        ("layers.0._orig_mod.attn.o_proj.weight", "attention"),
        ("layers.2._checkpoint_wrapped_module.ffn.router.weight", "router"),
        ("something.else", "other"),
    ],
)
def test_each_parameter_has_its_part(name: str, part: str) -> None:
    assert part_of(name) == part


def test_the_parts_split_the_global_norm_of_a_real_backward() -> None:
    torch.manual_seed(0)
    model = Transformer(load_config("configs/tiny/kha_moe.yaml").model)
    model.init_weights()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 33))
    model(ids[:, :-1], ids[:, 1:]).backward()
    parts = GradParts(model)
    assert parts.names == ["embedding", "norms", "head_mixing", "router", "experts",
                           "attention", "ffn"]  # fmt: skip
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm, by_part = parts.norms()
    total = torch.nn.utils.get_total_norm(list(grads.values()))
    torch.testing.assert_close(norm, total, rtol=1e-5, atol=0)  # fp32 sums in another order
    for i, part in enumerate(parts.names):
        mine = torch.stack([g.norm() for n, g in grads.items() if part_of(n) == part])
        torch.testing.assert_close(by_part[i], mine.norm(), rtol=1e-5, atol=0)
    # Parameters without a gradient count as zero.
    for n, p in model.named_parameters():
        if part_of(n) == "router":
            p.grad = None
    norm2, by_part2 = parts.norms()
    assert by_part2[parts.names.index("router")] == 0
    torch.testing.assert_close(norm2**2, (by_part2**2).sum(), rtol=1e-5, atol=0)


def test_spike_records_carry_the_split(tmp_path, tiny_dataset) -> None:
    """A poisoned gradient (every gradient x 1e4) at step K: the spike guard's skip record and
    the detector's spike record hold grad_norm_parts, whose squares add up to the grad norm."""
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, optim={"skip_step": GUARD}, logging={"log_every": 4},
                      train={"max_steps": 8, **NO_VAL})  # fmt: skip
    Inject.kind, Inject.at = "poisoned_gradient", K
    console = io.StringIO()
    train_here(cfg, Inject, console)
    (skip,) = records(run, "spike_skip")
    assert skip["step"] == K
    parts = skip["grad_norm_parts"]
    assert set(parts) == {"embedding", "norms", "head_mixing", "router", "experts", "attention"}
    assert math.isclose(math.sqrt(sum(v * v for v in parts.values())), skip["grad_norm"],
                        rel_tol=1e-4)  # fmt: skip
    spikes = [r for r in records(run, "spike") if r["step"] == K]
    assert spikes and all(r["grad_norm_parts"] == parts for r in spikes)
    assert f"spike at step {K}: grad_norm" in console.getvalue()
    assert "; grad norm from " in console.getvalue()  # the dominant part, on the console too
