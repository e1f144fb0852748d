"""The compiled training path (parallel.compile, on by default with CUDA) on the CPU: the same
trainer with its blocks compiled by Inductor gives the eager run's losses. On the GPU every run
takes this path; here it is the one test that does (compiling costs about a minute)."""

from __future__ import annotations

import io

import pytest
from train_helpers import losses, tiny_config, train_here

# fp32 on the CPU: Inductor's fused kernels may sum in another order than eager.
TOL = dict(rel=1e-5, abs=1e-6)


def test_compiled_training_matches_eager(tmp_path, tiny_dataset) -> None:
    steps = {"max_steps": 3}
    train_here(tiny_config(tmp_path / "eager", tiny_dataset, train=steps))
    compiled, console = tmp_path / "compiled", io.StringIO()
    cfg = tiny_config(compiled, tiny_dataset, train=steps, parallel={"compile": True})
    train_here(cfg, console=console)
    assert "settings: compile on, " in console.getvalue()  # (the loss compiles on CUDA only)
    eager, got = losses(tmp_path / "eager"), losses(compiled)
    assert sorted(got) == [1, 2, 3]
    assert got == pytest.approx(eager, **TOL)
