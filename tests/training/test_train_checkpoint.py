"""Checkpoint manager: atomic publish, keep-last rotation, interrupted saves, exact load, async
snapshots, and the model-shape mismatch error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from kha_train.config import ConfigError, ParallelConfig
from kha_train.training import distributed as D
from kha_train.training.checkpoint import (
    MARKER,
    CheckpointManager,
    complete_checkpoints,
    latest_checkpoint,
    resolve_resume,
)
from kha_train.training.parallel import build_mesh


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, width), nn.Linear(width, 2)])
        self.register_buffer("expert_bias", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](self.layers[0](x).relu())


def setup(width: int = 8):
    env = D.init_distributed("cpu")
    torch.manual_seed(0)
    model = Net(width)
    mesh = build_mesh(ParallelConfig(), env.device)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return env, model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"m.{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
           for k, v in model.state_dict().items()}  # fmt: skip
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            out[f"o.{i}.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


def test_publish_rotation_and_exact_load(tmp_path: Path) -> None:
    env, model, opt = setup()
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=False, env=env)
    saved = {}
    for step in range(1, 5):
        train_step(model, opt)
        model.expert_bias += 1  # a buffer: must travel with the model
        path = mgr.save(step, model, opt, {"step": step}, "name: x\n")
        saved[step] = snapshot(model, opt)
        assert (path / MARKER).is_file() and not path.with_name(path.name + ".tmp").exists()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 4]  # keep_last=2
    assert sorted(p.name for p in (tmp_path / "step_0000004").iterdir()) == [
        ".metadata", "COMPLETE", "MANIFEST.json", "__0_0.distcp", "config.yaml", "rng",
        "trainer_state.json",
    ]  # fmt: skip
    rng_after_save = torch.get_rng_state()
    torch.rand(10)  # move the RNG on; loading restores it
    train_step(model, opt)
    state = mgr.load(latest_checkpoint(tmp_path), model, opt)
    assert state == {"step": 4}
    now = snapshot(model, opt)
    assert now.keys() == saved[4].keys()
    assert all(torch.equal(now[k], saved[4][k]) for k in now), "load is not exact"
    assert torch.equal(torch.get_rng_state(), rng_after_save)


def test_interrupted_saves_are_never_loaded_and_are_cleaned_up(tmp_path: Path) -> None:
    env, model, opt = setup()
    mgr = CheckpointManager(tmp_path, keep_last=3, async_save=False, env=env)
    train_step(model, opt)
    good = mgr.save(1, model, opt, {"step": 1}, "")
    # What a kill -9 leaves: a .tmp folder with data but no marker; and a folder missing it.
    (tmp_path / "step_0000002.tmp").mkdir()
    (tmp_path / "step_0000002.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / "step_0000003").mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert resolve_resume("auto", tmp_path) == good
    assert resolve_resume("none", tmp_path) is None
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_0000003"), tmp_path)
    with pytest.raises(ConfigError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert resolve_resume("auto", tmp_path / "empty") is None
    CheckpointManager(tmp_path, keep_last=3, async_save=False, env=env)  # a restart
    assert not (tmp_path / "step_0000002.tmp").exists()
    # Saving a step that already exists (resumed from an earlier one) replaces it whole.
    again = mgr.save(1, model, opt, {"step": "again"}, "")
    assert json.loads((again / "trainer_state.json").read_text()) == {"step": "again"}


def test_async_save_snapshots_the_state_at_save_time(tmp_path: Path) -> None:
    """Each of two async saves holds the state of its own step, though training goes on while
    it is written."""
    env, model, opt = setup()
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=True, env=env)
    expected, paths = [], []
    for step in (1, 2):
        train_step(model, opt)
        expected.append(snapshot(model, opt))
        paths.append(mgr.save(step, model, opt, {"step": step}, ""))
        for _ in range(3):  # keeps training while the writer thread works
            train_step(model, opt)
            mgr.poll()
    mgr.wait()
    for path, want in zip(paths, expected):
        assert (path / MARKER).is_file()
        mgr.load(path, model, opt)
        now = snapshot(model, opt)
        assert all(torch.equal(now[k], want[k]) for k in now)
    assert not torch.equal(expected[0]["m.layers.0.weight"], expected[1]["m.layers.0.weight"])


def test_loading_another_model_shape_names_keys_shapes_and_settings(tmp_path: Path) -> None:
    env, model, opt = setup(width=8)
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=False, env=env)
    train_step(model, opt)
    path = mgr.save(1, model, opt, {"step": 1}, "model:\n  hidden_size: 8\n")
    D.teardown()
    env, other, other_opt = setup(width=6)
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=False, env=env)
    with pytest.raises(ConfigError) as err:
        mgr.load(path, other, other_opt, model_config={"hidden_size": 6})
    msg = str(err.value)
    assert "layers.0.weight: checkpoint [8, 4], this model [6, 4]" in msg
    assert "layers.1.weight: checkpoint [2, 8], this model [2, 6]" in msg
    assert "model.hidden_size: 8 vs 6" in msg
    assert "config.yaml" in msg and "checkpoint.resume=none" in msg
