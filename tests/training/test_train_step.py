"""The optimizer step (training/step.py): the benchmark's step is the trainer's, and the step's
loss and gradient are those of the mean over every target token of the global batch."""

from __future__ import annotations

import dataclasses
import io

import torch
from train_helpers import build, tiny_config

from kha_train.bench import BenchSettings
from kha_train.bench.workload import Workload
from kha_train.data.loader import Batch
from kha_train.model import Transformer
from kha_train.model.loss import IGNORE_INDEX
from kha_train.training import distributed as D
from kha_train.training.build import build_model
from kha_train.training.optim import build_optimizer
from kha_train.training.parallel import defers_grad_sync
from kha_train.training.schedule import lr_at
from kha_train.training.step import train_step
from kha_train.training.trainer import Trainer


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def test_bench_step_equals_the_trainers_step(tmp_path, tiny_dataset) -> None:
    """Same config, seed and batch: the same loss, grad norm, updated weights and expert bias."""
    cfg = build(tiny_config(tmp_path / "run", tiny_dataset))
    t = Trainer(cfg, console=io.StringIO())
    try:
        batches = t.loader.next_step()
        lr = lr_at(0, peak_lr=cfg.optim.lr, total_steps=t.total_steps, cfg=cfg.schedule)
        settings = BenchSettings(
            seq_len=cfg.data.seq_len, micro_batch=cfg.train.micro_batch_size, accum=len(batches)
        )
        w = Workload(
            cfg.model, settings, t.device, precision=cfg.train.precision,
            optim=dataclasses.replace(cfg.optim, lr=lr), seed=cfg.train.seed,
        )  # fmt: skip
        # The trainer's default parallel settings (its null defer_grad_sync: on for one rank).
        assert dataclasses.replace(w.pcfg, defer_grad_sync=None) == cfg.parallel
        assert defers_grad_sync(w.pcfg) and defers_grad_sync(cfg.parallel)
        ours, bench = t._step(batches), w.step(batches)
        assert torch.equal(bench.loss, ours.loss) and torch.isfinite(ours.loss)
        assert torch.equal(bench.grad_norm, ours.grad_norm) and bool(bench.ok)
        assert torch.equal(bench.counts, ours.counts)
        trained = dict(t.model.state_dict())
        for name, value in w.model.state_dict().items():  # parameters and the expert bias
            assert torch.equal(full(value), full(trained[name])), name
        assert any("expert_bias" in name and full(v).abs().sum() > 0 for name, v in trained.items())
    finally:
        t.close()
        D.teardown()


def random_batch(vocab: int, n_ignored: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids, labels = torch.randint(0, vocab, (2, 2, 16), generator=g)  # (B, T) each
    labels.view(-1)[:n_ignored] = IGNORE_INDEX
    zeros = torch.zeros_like(ids)
    return Batch(ids, labels, zeros, zeros, torch.arange(2))


def test_every_target_token_weighs_the_same(tmp_path, tiny_dataset) -> None:
    """Micro-batches with different numbers of targets: the step's loss and grad norm are the
    mean loss over all their target tokens, as one forward over the concatenated batch."""
    model_cfg = build(tiny_config(tmp_path / "run", tiny_dataset)).model
    model_cfg = dataclasses.replace(
        model_cfg, moe=dataclasses.replace(model_cfg.moe, num_experts=0)
    )
    batches = [random_batch(model_cfg.vocab_size, n, seed) for seed, n in enumerate((0, 20, 31))]
    ref = Transformer(model_cfg)
    torch.manual_seed(0)
    ref.init_weights()
    cat = [torch.cat([getattr(b, k) for b in batches]) for k in ("input_ids", "labels")]
    ref_loss = ref(*cat)  # mean over the 3 x 32 - 51 = 45 target tokens
    ref_loss.backward()
    ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))

    cfg = build(tiny_config(tmp_path / "run", tiny_dataset))
    model = build_model(model_cfg, cfg.parallel, cfg.train.precision, torch.device("cpu"), seed=0)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    out = train_step(model, opt, batches, parallel=cfg.parallel, grad_clip=1.0, lr=1e-3)
    torch.testing.assert_close(out.loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.grad_norm, ref_norm, rtol=1e-4, atol=1e-6)
    assert out.counts is None  # a dense model
