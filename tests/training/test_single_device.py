"""One process without FSDP2 (parallel.single_device: training/flat_params.py, flat_adamw.py):
the update is torch's AdamW, training follows the FSDP2 path, checkpoints resume exactly and
across the two paths, and impossible settings are refused."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from train_helpers import build, losses, tiny_config, train_here

from kha_train.config import ConfigError, OptimConfig
from kha_train.training import distributed as D
from kha_train.training.flat_adamw import FlatAdamW
from kha_train.training.flat_params import FlatParams
from kha_train.training.optim import build_optimizer, clip_gradients, param_groups
from kha_train.training.trainer import Trainer


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 4, bias=False)


def test_flat_adamw_is_torch_adamw_on_the_master_weights() -> None:
    """Same gradients (bf16, as autograd leaves them), decay groups, clipping through
    grad_scale and a skipped step: the fp32 master weights and moments follow torch's AdamW
    on fp32 weights to fp32 rounding, and the bf16 weights are the masters rounded."""
    torch.manual_seed(0)
    model = TwoLayers()
    ref = TwoLayers()
    ref.load_state_dict(model.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, implementation="foreach")
    flat = FlatParams(model)
    ours = FlatAdamW(flat, param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                     eps=cfg.eps, weight_decay=cfg.weight_decay)  # fmt: skip
    theirs = build_optimizer(ref, cfg, torch.device("cpu"))
    assert [g["weight_decay"] for g in ours.param_groups] == [0.1, 0.0]
    named_ref = dict(ref.named_parameters())
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for name, p in model.named_parameters():
            grad = torch.randn(p.shape, generator=g).to(torch.bfloat16) * (step + 1)
            p.grad = flat.view(flat.grad, p).copy_(grad)  # where the backward leaves it
            named_ref[name].grad = grad.float()
        skip = step == 2
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.float().norm() for p in model.parameters()])
        )
        clip_gradients(ours, list(model.parameters()), norm, max_norm=1.0)
        ours.found_inf = torch.tensor(float(skip))
        ours.step()
        if not skip:
            torch.nn.utils.clip_grads_with_norm_(list(ref.parameters()), 1.0, norm)
            theirs.step()
        ours.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        want = named_ref[name].detach()
        torch.testing.assert_close(flat.master_of(p), want, rtol=1e-5, atol=1e-6)
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), flat.master_of(p).to(torch.bfloat16)), name
        st, ref_st = ours.state[p], theirs.state[named_ref[name]]
        torch.testing.assert_close(st["exp_avg"], ref_st["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"], ref_st["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(st["step"]) == float(ref_st["step"]) == 4.0  # the skipped step not counted
    # The model's state dict holds the fp32 masters under the usual names.
    sd = model.state_dict()
    assert {k: v.dtype for k, v in sd.items()} == {k: torch.float32 for k in ref.state_dict()}


@pytest.mark.parametrize("count", [1, 3])
def test_gradients_of_micro_batches_are_summed_in_fp32(count: int) -> None:
    """The backward's bf16 gradients land in the flat buffer: one micro-batch: as autograd made
    them; several: summed in fp32 and rounded to bf16 once, a parameter unused by a micro-batch
    included. Exact: the same kernels on the same inputs, summed in the same order."""
    torch.manual_seed(0)
    model = TwoLayers()
    plain = TwoLayers().to(torch.bfloat16)  # the same bf16 weights, no flat buffers
    plain.load_state_dict(model.state_dict())
    flat = FlatParams(model)
    xs = [torch.randn(5, 8, dtype=torch.bfloat16) for _ in range(count)]

    def loss(m: TwoLayers, x: torch.Tensor, i: int) -> torch.Tensor:
        h = m.norm(m.proj(x))
        return (m.out(h).float().square().sum() if i != 1 else h.float().sum()) / 3

    total = {n: torch.zeros(p.shape) for n, p in plain.named_parameters()}
    for i, x in enumerate(xs):
        flat.begin_micro_batch(i, count)
        loss(model, x, i).backward()  # micro-batch 1 does not use `out`
        flat.end_micro_batch()
        assert all((p.grad is not None) == (i == count - 1) for p in model.parameters())
        plain.zero_grad(set_to_none=True)
        loss(plain, x, i).backward()
        for n, p in plain.named_parameters():
            if p.grad is not None:
                total[n] += p.grad.float()
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.bfloat16
        assert p.grad.data_ptr() == flat.view(flat.grad, p).data_ptr()
        assert torch.equal(p.grad, total[n].to(torch.bfloat16)), n
    # A second step starts clean (no stale accumulator, no stale gradient).
    flat.zero_grads()
    assert all(p.grad is None for p in model.parameters())
    flat.begin_micro_batch(0, 1)
    loss(model, xs[0], 1).backward()  # `out` unused: its gradient is zero, not last step's
    flat.end_micro_batch()
    assert torch.equal(model.out.weight.grad, torch.zeros_like(model.out.weight))


class StopAt3(Trainer):
    """Behaves as if SIGTERM arrived during step 3 (a checkpoint is saved, the run stops)."""

    def _step(self, micro_batches):
        result = super()._step(micro_batches)
        if self.step == 3:
            self._stop_signal = "SIGTERM"
        return result


def _run(path: Path, dataset: Path, single: bool, **sections) -> dict:
    cfg = tiny_config(path, dataset, **sections)
    cfg.setdefault("train", {})["precision"] = "bf16"
    cfg.setdefault("parallel", {})["single_device"] = single
    return cfg


def test_trains_like_fsdp_and_resumes_exactly(tmp_path: Path, tiny_dataset: Path) -> None:
    """The same 6 steps (4 micro-batches each) on both paths: the first step's loss is the
    same, the rest agree to bf16's rounding. 3 steps, stop, resume, 3 more == 6 straight,
    bitwise (the masters and moments are checkpointed, the bf16 weights rebuilt from them)."""
    fsdp, straight, split = tmp_path / "fsdp", tmp_path / "straight", tmp_path / "split"
    train_here(_run(fsdp, tiny_dataset, single=False))
    train_here(_run(straight, tiny_dataset, single=True))
    ref, ours = losses(fsdp), losses(straight)
    assert ours[1] == ref[1]
    for step in ref:
        assert abs(ours[step] - ref[step]) <= 2e-3 * abs(ref[step]), (step, ours, ref)
    cfg = _run(split, tiny_dataset, single=True)
    train_here(cfg, StopAt3)
    assert sorted(losses(split)) == [1, 2, 3]
    cfg["checkpoint"]["resume"] = "auto"
    train_here(cfg)
    assert losses(split) == ours


@pytest.mark.parametrize("first", [False, True])
def test_checkpoints_resume_across_the_two_paths(
    tmp_path: Path, tiny_dataset: Path, first: bool
) -> None:
    """A checkpoint of one path loads into the other: the same fp32 weights and AdamW state
    (checked tensor by tensor after loading), and training goes on."""
    run = tmp_path / "run"
    train_here(_run(run, tiny_dataset, single=first, train={"max_steps": 3}))
    cfg = build(_run(run, tiny_dataset, single=not first, train={"max_steps": 6},
                     checkpoint={"resume": "auto"}))  # fmt: skip
    saved = build(_run(tmp_path / "other", tiny_dataset, single=first))
    t = Trainer(cfg, console=io.StringIO())
    try:
        assert t.step == 3
        assert isinstance(t.optimizer, FlatAdamW) == (not first)
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(t.model, t.optimizer)
        loaded = _full(model_sd)
        assert all(v.dtype == torch.float32 for k, v in loaded.items() if "weight" in k)
        import torch.distributed.checkpoint as dcp

        ref = {"model": _full(model_sd), "optim": _full(optim_sd)}
        dcp.load(ref, checkpoint_id=str(run / "checkpoints/step_0000003"))
        for k, v in loaded.items():
            assert torch.equal(v, ref["model"][k]), k
        for k, v in _full(optim_sd)["state"].items():
            for name in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(v[name].float(), ref["optim"]["state"][k][name].float()), k
        t.train()
    finally:
        t.close()
        D.teardown()
    assert sorted(losses(run)) == list(range(1, 7))
    assert saved.parallel.single_device == first


def _full(tree):
    if isinstance(tree, dict):
        return {k: _full(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_full(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        t = tree.full_tensor() if hasattr(tree, "full_tensor") else tree
        return t.detach().clone()
    return tree


def test_impossible_settings_are_refused(tmp_path: Path, tiny_dataset: Path) -> None:
    from kha_train.config_checks import validate

    cfg = build(_run(tmp_path, tiny_dataset, single=True))
    with pytest.raises(ConfigError, match="single_device=true runs one process"):
        validate(cfg, world_size=2)
    fp32 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    with pytest.raises(ConfigError, match=r"needs train\.precision bf16 or fp8"):
        validate(fp32)


def test_a_checkpoint_does_not_change_which_adamw_kernel_runs(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    """A checkpoint saved by FlatAdamW (or by torch's foreach AdamW) holds group settings
    such as fused=None; loading it into a fused AdamW keeps the fused kernel, whose
    device-side skip of non-finite steps the step relies on."""
    run = tmp_path / "run"
    train_here(_run(run, tiny_dataset, single=True, train={"max_steps": 3}))
    cfg = build(_run(run, tiny_dataset, single=False, train={"max_steps": 6},
                     optim={"implementation": "fused"}, checkpoint={"resume": "auto"}))  # fmt: skip
    t = Trainer(cfg, console=io.StringIO())
    try:
        assert t.step == 3
        assert all(g["fused"] is True and not g["foreach"] for g in t.optimizer.param_groups)
    finally:
        t.close()
        D.teardown()


def test_the_settings_line_and_memory_estimate_name_the_mode(
    tmp_path: Path, tiny_dataset: Path
) -> None:
    from kha_train.tools.info import info_text
    from kha_train.training.parallel import settings_line

    cfg = build(_run(tmp_path, tiny_dataset, single=True))
    line = settings_line(cfg, "cuda", 1)
    assert "single device (no FSDP2, flat buffers)" in line and "reshard" not in line
    fsdp = build(_run(tmp_path, tiny_dataset, single=False))
    assert "reshard_after_forward off (auto)" in settings_line(fsdp, "cuda", 1)
    assert "grads" in info_text(cfg, 1) and info_text(cfg, 1) != info_text(fsdp, 1)


def test_views_are_aligned_and_drift_reads_the_masters(tmp_path: Path, tiny_dataset: Path) -> None:
    """Every view starts a multiple of 128 bytes into its buffer (whose base CUDA's allocator
    aligns; grouped GEMMs need 16 bytes), also after a parameter of an odd size; the KHA drift is computed from the fp32 masters, whose
    small moves from the identity the bf16 copies round away."""
    from kha_train.training.build import build_model
    from kha_train.training.flat_params import flat_params_of
    from kha_train.training.kha_drift import kha_drift

    model = TwoLayers()
    model.odd = nn.Parameter(torch.ones(3, 3))  # 9 elements: the next view would be misaligned
    flat = FlatParams(model)
    for p in model.parameters():
        assert (flat.view(flat.param, p).data_ptr() - flat.param.data_ptr()) % 128 == 0
        assert (flat.master_of(p).data_ptr() - flat.master.data_ptr()) % 256 == 0
    cfg = build(_run(tmp_path, tiny_dataset, single=True))
    tiny = build_model(cfg.model, cfg.parallel, cfg.train.precision, torch.device("cpu"), seed=0)
    flat = flat_params_of(tiny)
    assert kha_drift(tiny) == [0.0, 0.0]
    with torch.no_grad():
        for name, p in tiny.named_parameters():
            if "kha_v.w_up" in name:
                flat.master_of(p).add_(
                    1e-3 * torch.eye(p.shape[0])
                )  # |1 + 1e-3| rounds to 1 in bf16
    flat.sync_params()
    drift = kha_drift(tiny)
    assert all(d > 0 for d in drift), drift


def test_the_compiled_update_is_the_eager_one() -> None:
    """The AdamW pass as torch.compile makes it (CUDA's path; Inductor's CPU backend here):
    the same in-place results as the eager pass (fp32 rounding), a skipped step included."""
    from kha_train.training.flat_adamw import _adamw_chunk

    compiled = torch.compile(_adamw_chunk, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    n = 1000
    state = [torch.randn(n, generator=g), None, torch.randn(n, generator=g).bfloat16(),
             torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01]  # fmt: skip
    state[1] = state[0].bfloat16()
    for keep in (1.0, 0.0):
        coef = torch.tensor([1 - 1e-3 * 0.1, 1e-3 / 0.1, 1 / 0.3, 0.5, keep, 1e-8])
        eager = [t.clone() for t in state]
        comp = [t.clone() for t in state]
        _adamw_chunk(*eager, coef, 0.9, 0.95)
        compiled(*comp, coef, 0.9, 0.95)
        for a, b in zip(eager, comp, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        changed = not torch.equal(eager[0], state[0])
        assert changed == (keep == 1.0)  # a skipped step leaves the masters as they were


@pytest.mark.slow
def test_the_device_script_trains_replays_and_compares(tmp_path: Path, tiny_dataset: Path) -> None:
    """scripts/device/single_train.sh end to end on the CPU, every model a tiny one: the
    deterministic single_device run, its replay from the middle checkpoint (bitwise, as on the
    GPU with train.deterministic), both modes of the reference row, the main row, the summary."""
    import os
    import subprocess
    import sys

    from train_helpers import REPO, write_config

    cfg = tiny_config(tmp_path / "unused", tiny_dataset, train={"precision": "bf16"})
    config = write_config(tmp_path / "tiny.yaml", cfg)
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    shims = REPO / "tests" / "device_shims"
    env = {
        **os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
        "SHIM_LOG": str(tmp_path / "calls.log"), "REAL_PYTHON": sys.executable,
        "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DATA": str(tiny_dataset),
        "WORK": str(work), "SMALL_CONFIG": str(config), "REF_CONFIG": str(config),
        "MAIN_CONFIG": str(config), "SMALL_STEPS": "6",
        "REF_ARGS": "train.micro_batch_size=2 train.global_batch_tokens=128 train.max_steps=3",
        "MAIN_ARGS": "data.seq_len=32 train.micro_batch_size=2 train.global_batch_tokens=64 "
        "train.max_steps=3",
    }  # fmt: skip
    proc = subprocess.run(["bash", "scripts/device/single_train.sh", "900"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    for name in ("small_det", "ref_single", "ref_fsdp", "main_single"):
        assert f"== {name}: exit 0" in text, text
    assert "== replay from step 3: exit 0" in text, text
    import json

    report = json.loads((out / "replay.json").read_text())
    assert report["bitwise_equal"] is True and report["deterministic"], report
    assert [r["step"] for r in report["losses"]] == [4, 5, 6]
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("small_det:", "ref_"))]
    assert len(summary) == 3 and all("end ['completed']" in line for line in summary), summary
    assert "main_single: 3 steps" in proc.stdout


def test_new_pass_lengths_past_the_limit_run_in_small_eager_chunks() -> None:
    """Dynamo compiles one function for a few shapes only; past MAX_COMPILED_LENGTHS distinct
    pass lengths the update runs eagerly in chunks of CHUNK_EAGER (bounded temporaries), and
    after the benchmark's dynamo reset the lengths are forgotten."""
    from kha_train.training import flat_adamw as fa

    fa.forget_compiled_lengths()
    cuda = torch.device("cuda")  # only compared, never used: no GPU needed
    for n in range(fa.MAX_COMPILED_LENGTHS):
        [(a, b, fn)] = list(fa._passes(cuda, 0, 1000 + n))
        assert (a, b) == (0, 1000 + n) and fn is not fa._adamw_chunk
    size = 2 * fa.CHUNK_EAGER + 5
    passes = list(fa._passes(cuda, 0, size))
    assert [(a, b) for a, b, _ in passes] == [
        (0, fa.CHUNK_EAGER), (fa.CHUNK_EAGER, 2 * fa.CHUNK_EAGER), (2 * fa.CHUNK_EAGER, size)
    ]  # fmt: skip
    assert all(fn is fa._adamw_chunk for _, _, fn in passes)
    [(_, _, fn)] = list(fa._passes(cuda, 0, 1000))  # a length compiled already: still compiled
    assert fn is not fa._adamw_chunk
    fa.forget_compiled_lengths()
    [(_, _, fn)] = list(fa._passes(cuda, 0, size))
    assert fn is not fa._adamw_chunk
    fa.forget_compiled_lengths()


def test_the_benchmark_compares_the_modes() -> None:
    """`kha-train bench --mode single,fsdp`: rows named by mode, the speed-up, and the check of
    both losses (the first step's nearly equal, the last timed step's within bf16 drift)."""
    from kha_train.bench import BenchSettings, build_arg_parser
    from kha_train.bench.cli import format_table

    assert build_arg_parser().parse_args(["--mode", "single,fsdp"]).mode == "single,fsdp"

    def row(mode: str, tps: float, first: float, last: float) -> dict[str, object]:
        return {"variant": "kha", "mode": mode, "precision": "bf16", "params_b": 2.3,
                "active_b": 0.4, "step_ms": 16384 / tps * 1e3, "tokens_per_s": tps,
                "tflops": 400.0, "mfu": 0.45, "peak_mem_gib": 50.0, "sync_check": "ok",
                "first_loss": first, "loss": last}  # fmt: skip

    s = BenchSettings(mode="single")
    good = format_table([row("single", 99086.0, 12.15867, 11.73338),
                         row("fsdp", 87344.0, 12.15867, 11.73978)], s)  # fmt: skip
    import re

    assert re.search(r"^kha/single +bf16", good, re.M) and re.search(r"^kha/fsdp +bf16", good, re.M)
    assert "mode=single,fsdp," in good
    assert "single_device speed-up (kha bf16): tokens/s x1.1344 over FSDP2" in good
    assert "single_device numerics (kha bf16): first step 12.15867 vs 12.15867 (0.0e+00)" in good
    assert good.splitlines()[-1].endswith(": ok")
    bad = format_table([row("single", 99086.0, 12.15867, 12.3),
                        row("fsdp", 87344.0, 12.15867, 11.7)], s)  # fmt: skip
    assert "last timed step 12.30000 vs 11.70000 (5.1e-02 > 0.01): FAILED" in bad
