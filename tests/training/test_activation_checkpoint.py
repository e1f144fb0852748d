"""parallel.activation_checkpointing: every mode gives the gradients of no checkpointing; full
re-runs the forward's matrix products in the backward, selective re-runs none of them; expert
loads are counted once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from model.model_helpers import build, make_cfg
from torch.utils._python_dispatch import TorchDispatchMode

from kha_train.config import ACMode, ParallelConfig
from kha_train.model import collect_expert_counts
from kha_train.training.activation_checkpoint import (
    SAVED_OPS,
    apply_activation_checkpointing,
    checkpointed_blocks,
)


class CountOps(TorchDispatchMode):
    """Counts the aten ops run while it is active, by overload packet."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def _run(mode: ACMode) -> tuple[torch.Tensor, dict[str, torch.Tensor], Counter, torch.Tensor]:
    """(loss, grads, ops run by the backward, expert counts) of one step of the tiny model."""
    model = build(make_cfg(kha="mlp"), seed=3)  # 3 layers: a dense first, MoE + KHA-MLP after
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing=mode))
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 16))
    loss = model(ids, ids.roll(-1, dims=1))
    with CountOps() as ops:
        loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None}  # fmt: skip
    return loss.detach(), grads, ops.counts, collect_expert_counts(model)


def _matmuls(counts: Counter) -> int:
    return sum(n for op, n in counts.items() if op in SAVED_OPS)


def test_every_mode_gives_the_gradients_of_no_checkpointing() -> None:
    loss, grads, _, loads = _run(ACMode.none)
    for mode in (ACMode.full, ACMode.selective):
        l2, g2, _, loads2 = _run(mode)
        torch.testing.assert_close(l2, loss, rtol=1e-6, atol=1e-6)
        assert g2.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g2[name], g, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(loads2, loads)  # a re-run forward counts no expert loads


def test_selective_recomputes_no_matrix_product_and_full_recomputes_them_all() -> None:
    _, _, none, _ = _run(ACMode.none)
    _, _, full, _ = _run(ACMode.full)
    _, _, selective, _ = _run(ACMode.selective)
    assert _matmuls(none) > 0
    assert _matmuls(full) > _matmuls(none)  # the blocks' forward products again
    assert _matmuls(selective) == _matmuls(none)
    # ...but the cheap steps between them are recomputed (e.g. the norms' reductions).
    assert sum(selective.values()) > sum(none.values())


@pytest.mark.parametrize(
    ("mode", "every", "expected"),
    [
        ("none", 2, []),
        ("full", 2, [0, 1, 2, 3]),
        ("selective", 2, [0, 1, 2, 3]),
        ("every_n", 2, [0, 2]),
        ("every_n", 3, [0, 3]),
    ],
)
def test_checkpointed_blocks(mode, every, expected) -> None:
    cfg = ParallelConfig(activation_checkpointing=ACMode(mode), ac_every_n=every)
    assert checkpointed_blocks(cfg, 4) == expected


def test_selective_survives_the_grouped_mm_probe_inside_the_first_block() -> None:
    """The experts probe once whether torch._grouped_mm runs here; when that first happens
    inside a selectively checkpointed block, the recompute must not be handed the probe's
    product in place of the experts' (it was: a shape error in the first backward on a CPU)."""
    from kha_train.model.moe import experts

    experts._cpu_grouped_mm_works.__wrapped__.cache_clear()  # as in a fresh process
    loss, grads, _, _ = _run(ACMode.selective)
    experts._cpu_grouped_mm_works.__wrapped__.cache_clear()
    ref_loss, ref_grads, _, _ = _run(ACMode.none)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)
