"""Adaptive clipping (optim.clip_mode, training/clipping.py): ZClip and AdaGC against plain
ports of their reference code, both optimizer implementations, sharded gradients, a step that
is not applied, config checks, and ZClip in the trainer."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from train_helpers import build, tiny_config

from kha_train.config import ConfigError
from kha_train.config_checks import validate
from kha_train.training import distributed as D
from kha_train.training.build import build_model
from kha_train.training.clipping import AdaGC, ZClip, build_clipper, load_clip_state
from kha_train.training.optim import tensor_grad_norms
from kha_train.training.trainer import Trainer


class RefZClip:
    """bluorion-com/ZClip's ``ZClip.step`` (mode zscore, adaptive_scaling, EMA updated with the
    clip value on a spike), on plain floats; returns the factor the gradients are scaled by."""

    def __init__(self, alpha: float, z_thresh: float, warmup: int, max_grad_norm: float) -> None:
        self.alpha, self.z_thresh, self.warmup, self.cap = alpha, z_thresh, warmup, max_grad_norm
        self.buffer: list[float] = []
        self.mean = self.var = 0.0
        self.initialized = False

    def step(self, g: float) -> float:
        if not self.initialized:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized = True
            return min(1.0, self.cap / (g + 1e-6)) if self.cap else 1.0  # clip_grad_norm_
        std = self.var**0.5
        z = (g - self.mean) / (std + 1e-6)
        clip_val = (
            self.mean + self.z_thresh * std / (z / self.z_thresh) if z > self.z_thresh else None
        )
        effective = clip_val if clip_val is not None else g
        if self.cap:
            effective = min(effective, self.cap)
        coef = effective / (g + 1e-6) if g > effective else 1.0
        e = clip_val if clip_val is not None else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * e
        self.var = self.alpha * self.var + (1 - self.alpha) * (e - self.mean) ** 2
        return coef


class RefAdaGC:
    """lishuai-97/AdaGC's ``AdaGC.clip_by_norm`` (Megatron patch) on plain floats, with this
    repository's one deviation (a zero norm leaves gamma alone); returns each tensor's factor."""

    def __init__(self, ratio: float, beta: float, warmup: int, max_norm: float) -> None:
        self.ratio, self.beta, self.warmup, self.max_norm = ratio, beta, warmup, max_norm
        self.steps = 0
        self.gamma: dict[int, float] = {}

    def step(self, norms: list[float]) -> list[float]:
        self.steps += 1
        total = math.sqrt(sum(n * n for n in norms))
        if self.steps <= self.warmup:
            c = min(1.0, self.max_norm / (total + 1e-6))
            for i, n in enumerate(norms):
                if n * c > 0:
                    self.gamma[i] = min(self.gamma.get(i, math.inf), n * c)
            return [c] * len(norms)
        out = []
        for i, n in enumerate(norms):
            avg = self.gamma.get(i)
            coef, value = 1.0, n
            if avg is not None and n > self.ratio * avg:
                coef, value = self.ratio * avg / (n + 1e-6), self.ratio * avg
            if value > 0:
                self.gamma[i] = value if avg is None else avg * self.beta + value * (1 - self.beta)
            out.append(coef)
        return out


def params_with_norms(shapes, norms, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape, n in zip(shapes, norms, strict=True):
        p = torch.nn.Parameter(torch.zeros(shape))
        d = torch.randn(shape, generator=g)
        p.grad = d / d.norm() * n
        params.append(p)
    return params


def scales(params, before: list[float]) -> list[float]:
    return [p.grad.norm().item() / b if b else 1.0 for p, b in zip(params, before, strict=True)]


@pytest.mark.parametrize(("impl", "cap"), [("foreach", 0.0), ("fused", 1.3)])
def test_zclip_matches_the_reference(impl: str, cap: float) -> None:
    norms = [1.0 + 0.1 * math.sin(i) for i in range(40)]
    norms[8], norms[15], norms[16], norms[30] = 5.0, 20.0, 3.0, 1.6
    skipped = {20}  # not applied: the state must not move
    ref = RefZClip(0.97, 2.5, 6, cap)
    clip = ZClip(0.97, 2.5, 6, cap, torch.device("cpu"))
    for i, n in enumerate(norms):
        (p,) = params_with_norms([(3, 5)], [n], seed=i)
        opt = torch.optim.AdamW([p], fused=impl == "fused", foreach=impl == "foreach")
        state = json.dumps(clip.state_dict())
        clip.clip(opt, [p], torch.tensor(n), torch.tensor(i not in skipped))
        got = 1 / opt.grad_scale.item() if impl == "fused" else scales([p], [n])[0]
        if i in skipped:
            assert json.dumps(clip.state_dict()) == state
            continue
        want = ref.step(n)
        assert got == pytest.approx(want, rel=1e-5), (i, n)
    assert clip.mean.item() == pytest.approx(ref.mean, rel=1e-6)  # fp32 inputs
    assert clip.var.item() == pytest.approx(ref.var, rel=1e-5)
    fresh = ZClip(0.97, 2.5, 6, cap, torch.device("cpu"))
    assert load_clip_state(fresh, json.loads(json.dumps(clip.state_dict())))
    assert fresh.state_dict() == clip.state_dict()


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adagc_matches_the_reference(impl: str) -> None:
    """Four tensors, a warmup of 3 steps with the global clip binding, one tensor whose
    gradient is zero at first (its gamma waits for a nonzero norm), outliers per tensor."""
    shapes = [(4, 4), (7,), (2, 3, 2), (5,)]
    series = [[1.0, 0.5, 0.2, 0.0], [0.9, 0.6, 0.25, 0.0], [1.1, 0.4, 0.3, 0.1]]
    series += [[1.0 + 0.05 * i, 0.5, 0.2, 0.1] for i in range(8)]
    series[5] = [10.0, 0.5, 0.2, 0.1]  # one tensor spikes: only it is clipped
    series[7] = [1.0, 0.5, 3.0, 0.1]
    series[9] = [1.0, 0.0, 0.2, 0.1]  # a zero gradient: that tensor's gamma stays
    skipped = {6}
    ref = RefAdaGC(1.04, 0.99, 3, 1.0)
    clip = AdaGC(1.04, 0.99, 3, 1.0, torch.device("cpu"))
    for i, norms in enumerate(series):
        params = params_with_norms(shapes, norms, seed=i)
        opt = torch.optim.AdamW(params, fused=impl == "fused", foreach=impl == "foreach")
        total = torch.tensor(norms).norm()
        state = json.dumps(clip.state_dict())
        clip.clip(opt, params, total, torch.tensor(i not in skipped))
        got = scales(params, norms)
        if impl == "fused":
            assert getattr(opt, "grad_scale", None) is None  # clipped in the gradients
        if i in skipped:
            assert json.dumps(clip.state_dict()) == state
            continue
        want = [c if n else 1.0 for c, n in zip(ref.step(norms), norms, strict=True)]
        assert got == pytest.approx(want, rel=1e-5), i  # (a zero gradient: any factor)
    assert clip.gamma is not None
    want = [ref.gamma.get(i, math.inf) for i in range(len(shapes))]
    assert clip.gamma.tolist() == pytest.approx(want, rel=1e-5)
    fresh = AdaGC(1.04, 0.99, 3, 1.0, torch.device("cpu"))
    assert load_clip_state(fresh, json.loads(json.dumps(clip.state_dict())))
    assert fresh.state_dict() == clip.state_dict()
    assert not load_clip_state(fresh, {"mode": "zclip"})  # another mode starts fresh


def test_per_tensor_norms_of_fsdp2_sharded_gradients(tmp_path, tiny_dataset) -> None:
    """DTensor gradients (FSDP2, one rank): each tensor's norm is that of the whole tensor
    (two ranks: test_train_spike_guard.py's torchrun test)."""
    cfg = build(tiny_config(tmp_path / "run", tiny_dataset))
    D.init_distributed("cpu")
    model = build_model(cfg.model, cfg.parallel, cfg.train.precision, torch.device("cpu"), seed=0)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(ids, ids).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert any(hasattr(g, "full_tensor") for g in grads)
    want = torch.stack(
        [(g.full_tensor() if hasattr(g, "full_tensor") else g).norm() for g in grads]
    )
    torch.testing.assert_close(tensor_grad_norms(grads), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"clip_mode": "zclip", "zclip": {"alpha": 1.0}}, "optim.zclip.alpha must be in (0, 1)"),
        ({"zclip": {"warmup": 1}}, "warmup >= 2"),
        ({"adagc": {"ratio": 0.9}}, "optim.adagc.ratio must be >= 1"),
        ({"adagc": {"beta": 1.0}}, "beta in [0, 1)"),
        ({"skip_step": {"min_history": 200}}, "optim.skip_step.min_history=200 must be in [2"),
        ({"skip_step": {"window": 1}}, "optim.skip_step.window must be >= 2"),
        ({"skip_step": {"max_in_row": 0}}, "optim.skip_step.max_in_row must be >= 1"),
    ],
)
def test_config_checks(tmp_path, tiny_dataset, overrides: dict, needle: str) -> None:
    cfg = build(tiny_config(tmp_path, tiny_dataset, optim=overrides))
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert needle in str(e.value)


def test_zclip_in_the_trainer_checkpoints_its_state(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(
        run, tiny_dataset, optim={"clip_mode": "zclip", "zclip": {"warmup": 2}, "grad_clip": 0},
        train={"max_steps": 4, "val_every": 0, "val_batches": 0}, checkpoint={"every_steps": 0},
    )  # fmt: skip
    t = Trainer(build(cfg), console=io.StringIO())
    try:
        assert isinstance(t.monitor.clipper, ZClip)
        t.train()
    finally:
        t.close()
        D.teardown()
    state = json.loads((run / "checkpoints/step_0000004/trainer_state.json").read_text())
    assert state["clip"]["mode"] == "zclip" and state["clip"]["seen"] == 2  # the warmup
    assert state["clip"]["mean"] > 0 and state["spike_skip"]["guard"] is None
    assert type(build_clipper(build(cfg).optim, torch.device("cpu"))) is ZClip
