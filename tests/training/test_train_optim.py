"""AdamW decay groups and the fused kernel's device-side skip of a non-finite step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kha_train.config import OptimConfig
from kha_train.training.optim import (
    build_optimizer,
    clean_param_name,
    is_fused,
    param_groups,
    summarize_groups,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4, bias=True)
        self.attn_norm = nn.LayerNorm(4)
        self.kha_v = nn.Linear(4, 4, bias=False)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def group_names(model: nn.Module, cfg: OptimConfig) -> dict[str, set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["group"]: {ids[id(p)] for p in g["params"]} for g in param_groups(model, cfg)}


def test_default_groups_keep_norms_biases_embeddings_and_kha_out_of_decay() -> None:
    groups = group_names(Tiny(), OptimConfig())
    assert groups["decay"] == {"proj.weight"}
    assert groups["no_decay"] == {
        "embed_tokens.weight", "proj.bias", "attn_norm.weight", "attn_norm.bias", "kha_v.weight",
    }  # fmt: skip
    # Frozen parameters are in no group; custom lists replace the default.
    groups = group_names(Tiny(), OptimConfig(no_decay=["bias"]))
    assert "frozen" not in groups["decay"] | groups["no_decay"]
    assert groups["no_decay"] == {"proj.bias", "attn_norm.bias"}


def test_wrapper_prefixes_do_not_change_the_grouping() -> None:
    assert clean_param_name("layers.0._checkpoint_wrapped_module.attn_norm.weight") == (
        "layers.0.attn_norm.weight"
    )
    assert clean_param_name("layers.1._orig_mod.ffn.w") == "layers.1.ffn.w"


def test_build_optimizer_implementation_and_hyperparameters() -> None:
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05, beta1=0.8, beta2=0.9, eps=1e-7)
    opt = build_optimizer(Tiny(), cfg, torch.device("cpu"))
    assert not is_fused(opt) and opt.defaults["foreach"]  # auto on CPU: foreach
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-7
    summary = {s.name: s for s in summarize_groups(opt)}
    assert summary["decay"].weight_decay == 0.05 and summary["no_decay"].weight_decay == 0.0
    assert summary["decay"].num_params == 16
    fused = build_optimizer(Tiny(), OptimConfig(implementation="fused"), torch.device("cpu"))
    assert is_fused(fused)


def test_fused_found_inf_leaves_weights_moments_and_step_untouched() -> None:
    """The mechanism the trainer relies on to skip a non-finite step without a host sync."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = build_optimizer(model, OptimConfig(implementation="fused"), torch.device("cpu"))
    x = torch.randn(8, 4)

    def step(bad: bool) -> None:
        loss = model(x).pow(2).mean() * (float("nan") if bad else 1.0)
        loss.backward()
        ok = torch.isfinite(torch.stack([p.grad.norm() for p in model.parameters()])).all()
        opt.found_inf = (~ok).float()
        opt.step()
        opt.zero_grad()

    step(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())}
    step(True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            assert torch.equal(v, state[i][k]), k  # exp_avg, exp_avg_sq and step
    step(False)
    assert not torch.equal(before["weight"], model.weight)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_weight_decay_applies_only_to_the_decay_group(impl: str) -> None:
    model = Tiny()
    opt = build_optimizer(
        model, OptimConfig(lr=0.1, weight_decay=0.5, implementation=impl), torch.device("cpu")
    )
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only decoupled decay can move a weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["proj.weight"], before["proj.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(after["proj.bias"], before["proj.bias"])
    assert torch.equal(after["embed_tokens.weight"], before["embed_tokens.weight"])
