"""parallelize() on one in-process rank: deferred gradient sync over micro-batches."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from kha_train.config import (
    AttnBackend,
    KHAConfig,
    KHAVariant,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    Precision,
)
from kha_train.model import Transformer
from kha_train.training import distributed as D
from kha_train.training.parallel import parallelize, set_micro_batch_sync

CFG = ModelConfig(
    vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    ffn_size=64, attn_backend=AttnBackend.math,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=16),
    kha=KHAConfig(variant=KHAVariant.mlp, targets=["v"]),
)  # fmt: skip


def accumulated_grads(
    defer: bool, batches: list[torch.Tensor], precision: Precision, reshard: bool | None = None
) -> dict[str, torch.Tensor]:
    """Gradients after one step's micro-batches, read after each micro-batch as FSDP holds them."""
    D.init_distributed("cpu")
    cfg = ParallelConfig(defer_grad_sync=defer, reshard_after_forward=reshard)
    with torch.device("meta"):
        model = Transformer(CFG)
    parallelize(model, cfg, precision, torch.device("cpu"))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    for i, ids in enumerate(batches):
        last = i == len(batches) - 1
        set_micro_batch_sync(model, cfg, last=last)
        model(ids, ids).backward()
        if not last:
            # Deferred: parameters stay gathered (plain tensors; the unreduced gradients are
            # held by FSDP); otherwise they are resharded (DTensors) with reduced gradients.
            sharded = [isinstance(p, DTensor) for p in model.parameters()]
            assert not any(sharded) if defer else all(sharded)
            if not defer:
                assert all(p.grad is not None for p in model.parameters())
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    D.teardown()
    return grads


@pytest.mark.parametrize("reshard", [None, True])
@pytest.mark.parametrize("precision", [Precision.fp32, Precision.bf16])
def test_deferred_sync_reduces_once_and_gives_the_same_gradients(
    precision: Precision, reshard: bool | None
) -> None:
    """bf16: FSDP2 accumulates the unsharded bf16 gradients in its fp32 reduce dtype, so the
    result matches per-micro-batch fp32 reduction up to summation order. reshard_after_forward
    (freeing each block's gathered weights after its forward, the memory a big model on one
    GPU needs for its activations) changes nothing of that."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CFG.vocab_size, (2, 16), generator=g) for _ in range(3)]
    every = accumulated_grads(False, batches, precision)
    deferred = accumulated_grads(True, batches, precision, reshard)
    assert every.keys() == deferred.keys()
    for name in every:
        assert deferred[name].dtype == torch.float32
        torch.testing.assert_close(deferred[name], every[name], rtol=1e-5, atol=1e-7, msg=name)


def test_without_fsdp_or_the_option_nothing_changes() -> None:
    model = torch.nn.Linear(2, 2)
    set_micro_batch_sync(model, ParallelConfig(defer_grad_sync=True), last=False)  # no FSDP: no-op
    model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is not None


def test_deferred_sync_and_keeping_params_default_on_only_when_nothing_is_sharded() -> None:
    from kha_train.training.parallel import defers_grad_sync, reshards_after_forward

    assert defers_grad_sync(ParallelConfig())  # one process: a shard group of one
    assert not defers_grad_sync(ParallelConfig(dp_shard=2))
    assert defers_grad_sync(ParallelConfig(dp_shard=2, defer_grad_sync=True))
    assert not defers_grad_sync(ParallelConfig(defer_grad_sync=False))
    assert not reshards_after_forward(ParallelConfig())
    assert reshards_after_forward(ParallelConfig(dp_shard=2))
    assert reshards_after_forward(ParallelConfig(reshard_after_forward=True))
    assert not reshards_after_forward(ParallelConfig(dp_shard=2, reshard_after_forward=False))


def test_compile_defaults_on_with_cuda_only_and_the_settings_line_says_so() -> None:
    from kha_train.config import Config
    from kha_train.training.parallel import compiles, settings_line

    assert compiles(ParallelConfig(), "cuda") and not compiles(ParallelConfig(), "cpu")
    assert not compiles(ParallelConfig(compile=False), "cuda")
    assert compiles(ParallelConfig(compile=True), "cpu")
    cfg = Config()
    gpu, cpu = settings_line(cfg, "cuda", 8), settings_line(cfg, "cpu", 1)
    assert (
        gpu.startswith("compile on (auto), loss compile on") and "reshard_after_forward on" in gpu
    )
    assert cpu.startswith("compile off (auto), loss compile off")
    assert "defer_grad_sync on (auto)" in cpu and "reshard_after_forward off (auto)" in cpu
    cfg.parallel.compile = False
    assert settings_line(cfg, "cuda", 1).startswith("compile off, ")
