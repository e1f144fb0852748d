"""train.precision=fp8 (training/fp8.py): which projections are converted, the config checks
that run before anything is built, checkpoints shared with bf16 (resume across precisions), and
training steps with torchao's emulated FP8 on the CPU (the same casts and scales, the GEMMs in
high precision)."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch import nn
from train_helpers import REPO, build, losses, tiny_config, train_here

from kha_train.config import (
    AttnBackend,
    Config,
    ConfigError,
    Fp8Config,
    Fp8Recipe,
    KHAConfig,
    KHAVariant,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    Precision,
    load_config,
)
from kha_train.config_checks import validate
from kha_train.model import Transformer
from kha_train.training import distributed as D
from kha_train.training.fp8 import (
    _FP8_ALL_GATHER_MODELS,
    convert_to_fp8,
    folded_projections,
    fp8_linear_class,
    fp8_modules,
    precompute_fp8_scales,
)

pytest.importorskip("torchao", reason="torchao (the fp8 and dev extras) runs the FP8 paths")

CPU = torch.device("cpu")
# Every kind of block: a dense first layer, MoE layers with a shared expert, KHA-MLP on V, an
# untied LM head (an nn.Linear of its own, which must stay high precision).
TINY = ModelConfig(
    vocab_size=96, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
    ffn_size=128, tie_embeddings=False, attn_backend=AttnBackend.math,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=32, num_shared_experts=1,
                  first_k_dense=1),
    kha=KHAConfig(variant=KHAVariant.mlp, targets=["v"]),
)  # fmt: skip
ALL = Fp8Config(min_dim=16, emulate=True)  # every block projection of TINY


def meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def attn(layers: range, *projs: str) -> list[str]:
    return [f"layers.{i}.attn.{p}" for i in layers for p in projs]


# -- which modules ------------------------------------------------------------------------------


def test_the_filter_takes_the_block_projections_and_nothing_else() -> None:
    model = meta_model(TINY)
    qkvo = ("q_proj", "k_proj", "v_proj", "o_proj")
    ffn = ("gate_proj", "up_proj", "down_proj")
    expected = sorted(
        attn(range(3), *qkvo)
        + [f"layers.0.ffn.{p}" for p in ffn]  # the dense layer
        + [f"layers.{i}.ffn.shared_experts.{p}" for i in (1, 2) for p in ffn]
    )
    assert sorted(fp8_modules(model, ALL)) == expected
    # The only other nn.Linear of the model is the LM head; everything else the filter must
    # never take (embedding, norms, router, KHA matrices, routed experts) is no nn.Linear.
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears - set(expected) == {"lm_head"}
    assert fp8_modules(model, Fp8Config()) == []  # the default min_dim 1024: none at this size
    # Dimensions that are not multiples of 16 are never converted (hidden 72: none of them).
    assert fp8_modules(meta_model(dataclasses.replace(TINY, hidden_size=72)), ALL) == []

    names = convert_to_fp8(model, ALL, CPU)
    assert names == expected
    fp8 = fp8_linear_class()
    assert {n for n, m in model.named_modules() if isinstance(m, fp8)} == set(expected)
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    for name, _ in model.named_parameters():  # router, norms, KHA, experts: untouched modules
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        assert isinstance(owner, fp8) == (name.rsplit(".", 1)[0] in expected), name


@pytest.mark.parametrize(
    ("config", "layers"),
    [("configs/paper/table5/moe_a0.44b_kha_mlp.yaml", 12), ("configs/paper/main/kha.yaml", 18)],
)
def test_paper_models_convert_q_and_o_by_default(config: str, layers: int) -> None:
    """Hidden 1152 (the reference) and 2048 (the main model), 32 x 128 query heads, 4 KV heads:
    q and o (hidden x 4096) by default; k and v (hidden x 512) from min_dim 512."""
    model = meta_model(load_config(REPO / config).model)
    assert sorted(fp8_modules(model, Fp8Config())) == sorted(
        attn(range(layers), "q_proj", "o_proj")
    )
    qkvo = attn(range(layers), "q_proj", "k_proj", "v_proj", "o_proj")
    assert sorted(fp8_modules(model, Fp8Config(min_dim=512))) == sorted(qkvo)


def test_folded_projections_get_their_fp8_gemm_and_no_fp8_all_gather() -> None:
    """KHA-MLP on V folds W_down into o; KHA-Linear on q, k, v folds T into each: those
    projections run ``forward_with_weight`` in FP8 and gather their weights in bf16."""
    linear = dataclasses.replace(
        TINY, kha=KHAConfig(variant=KHAVariant.linear, targets=["q", "k", "v"])
    )
    assert folded_projections(meta_model(TINY)) == set(attn(range(3), "o_proj"))
    assert folded_projections(meta_model(linear)) == set(
        attn(range(3), "q_proj", "k_proj", "v_proj")
    )
    no_kha = dataclasses.replace(TINY, kha=KHAConfig())
    assert folded_projections(meta_model(no_kha)) == set()

    gather = dataclasses.replace(ALL, fsdp_fp8_all_gather=True)
    model = meta_model(TINY)
    convert_to_fp8(model, gather, CPU)
    for name, m in model.named_modules():
        if isinstance(m, fp8_linear_class()):
            assert m.config.enable_fsdp_float8_all_gather == (not name.endswith("attn.o_proj"))
    assert model in _FP8_ALL_GATHER_MODELS

    # Each folded projection runs through forward_with_weight, with the bf16 model's result
    # up to FP8 rounding.
    for cfg, n_folded in ((TINY, 3), (linear, 9), (no_kha, 0)):
        torch.manual_seed(0)
        ref = Transformer(cfg)
        ref.init_weights()
        fp8 = Transformer(cfg)
        fp8.init_weights()  # the non-persistent buffers (RoPE's inv_freq): empty until then
        fp8.load_state_dict(ref.state_dict())
        convert_to_fp8(fp8, ALL, CPU)
        calls = []
        cls = fp8_linear_class()
        original = cls.forward_with_weight
        cls.forward_with_weight = lambda self, x, w, calls=calls, f=original: (
            calls.append(1) or f(self, x, w)
        )
        try:
            ids = torch.randint(
                0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)
            )
            got, want = fp8(ids, ids), ref(ids, ids)
        finally:
            cls.forward_with_weight = original
        assert len(calls) == n_folded
        torch.testing.assert_close(got, want, rtol=2e-2, atol=0)


# -- config checks, before anything is built ---------------------------------------------------


def fp8_config(**fp8: object) -> Config:
    cfg = Config()
    cfg.data.dataset = "unused"
    cfg.train.max_steps = 1
    cfg.train.precision = Precision.fp8
    cfg.parallel.fp8 = dataclasses.replace(cfg.parallel.fp8, **fp8)
    return cfg


def fake_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int] | None) -> None:
    """A machine with one GPU of ``capability`` (None: no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(capability is not None))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A100-SXM4-80GB")


def config_error(cfg: Config) -> str:
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    return str(e.value)


def test_fp8_needs_a_recent_gpu_and_torchao(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, (9, 0))
    validate(fp8_config())  # an H100 / H200
    fake_gpu(monkeypatch, (8, 0))
    msg = config_error(fp8_config())
    assert "compute capability >= 8.9" in msg and "A100-SXM4-80GB has 8.0" in msg
    assert "train.precision=bf16" in msg
    fake_gpu(monkeypatch, None)
    assert "needs a CUDA GPU and none is visible" in config_error(fp8_config())
    cpu = fp8_config()
    cpu.train.device = "cpu"
    assert "train.device=cpu" in config_error(cpu)
    validate(fp8_config(emulate=True))  # emulated FP8: any device
    bf16 = fp8_config()
    bf16.train.precision = Precision.bf16
    validate(bf16)  # the GPU matters only for fp8

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torchao" else find_spec(name, *a),
    )
    msg = config_error(fp8_config(emulate=True))
    assert "needs torchao >= 0.18" in msg and "pip install 'kha-train[fp8]'" in msg


def test_fp8_options_are_checked_whatever_the_precision() -> None:
    cfg = fp8_config(emulate=True, recipe=Fp8Recipe.rowwise, fsdp_fp8_all_gather=True, min_dim=8)
    cfg.train.precision = Precision.bf16
    msg = config_error(cfg)
    assert msg.count("\n  - ") == 2  # one ConfigError listing both
    assert "parallel.fp8.min_dim=8 must be >= 16" in msg
    assert "fsdp_fp8_all_gather=true needs parallel.fp8.recipe=tensorwise" in msg


def test_the_trainer_refuses_before_building_anything(
    tmp_path: Path, tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kha_train.training.trainer as trainer

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(trainer, "build_model", no_build)
    monkeypatch.setattr(trainer.D, "init_distributed", no_build)
    fake_gpu(monkeypatch, (8, 0))
    cfg = build(
        tiny_config(tmp_path / "run", tiny_dataset, train={"precision": "fp8", "device": "auto"})
    )
    with pytest.raises(ConfigError, match=r"compute capability >= 8\.9"):
        trainer.Trainer(cfg, console=io.StringIO())
    with pytest.raises(ConfigError, match=r"compute capability >= 8\.9"):
        convert_to_fp8(meta_model(TINY), Fp8Config(), "cuda")  # the same check, if called directly


# -- checkpoints and steps (emulated FP8 on the CPU) --------------------------------------------


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.mark.parametrize("all_gather", [False, True])
def test_state_dicts_and_checkpoints_are_shared_with_bf16(tmp_path: Path, all_gather: bool) -> None:
    from kha_train.training.build import build_model
    from kha_train.training.checkpoint import CheckpointManager
    from kha_train.training.optim import build_optimizer
    from kha_train.training.step import train_step

    env = D.init_distributed("cpu")
    fp8_cfg = ParallelConfig(fp8=dataclasses.replace(ALL, fsdp_fp8_all_gather=all_gather))
    fp8 = build_model(TINY, fp8_cfg, Precision.fp8, CPU, seed=0)
    bf16 = build_model(TINY, ParallelConfig(), Precision.bf16, CPU, seed=0)
    a, b = fp8.state_dict(), bf16.state_dict()
    assert list(a) == list(b)  # the same keys, in the same order
    for k in a:
        assert (a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype), k
        assert torch.equal(full(a[k]), full(b[k])), k  # the same initial weights

    opt = build_optimizer(fp8, OptimConfig(lr=1e-2), CPU)
    from kha_train.bench.workload import random_batches

    batches = random_batches(TINY.vocab_size, 2, 16, CPU, n=2)
    result = train_step(fp8, opt, batches, parallel=fp8_cfg, grad_clip=1.0, lr=1e-2)
    assert bool(result.ok)
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=False, env=env)
    path = mgr.save(1, fp8, opt, {"step": 1}, "")
    bf16_opt = build_optimizer(bf16, OptimConfig(lr=1e-2), CPU)
    mgr.load(path, bf16, bf16_opt)  # fp8 -> bf16
    trained = {k: full(v).clone() for k, v in fp8.state_dict().items()}
    for k, v in bf16.state_dict().items():
        assert torch.equal(full(v), trained[k]), k
    # and back: a bf16 step, saved, loaded into the fp8 model
    train_step(bf16, bf16_opt, batches, parallel=ParallelConfig(), grad_clip=1.0, lr=1e-2)
    path = mgr.save(2, bf16, bf16_opt, {"step": 2}, "")
    mgr.load(path, fp8, opt)
    for k, v in bf16.state_dict().items():
        assert torch.equal(full(fp8.state_dict()[k]), full(v)), k


def test_an_fp8_step_trains_like_bf16() -> None:
    """One step of the emulated FP8 model: loss and grad norm within FP8 rounding of bf16's;
    every parameter updated; with FP8 all-gather, the scales are precomputed at the step."""
    from kha_train.bench import BenchSettings
    from kha_train.bench.workload import Workload

    s = BenchSettings(seq_len=16, micro_batch=2, accum=2, fp8=ALL)
    out = {}
    for precision in (Precision.bf16, Precision.fp8):
        w = Workload(TINY, s, CPU, precision=precision)
        before = {n: full(p).clone() for n, p in w.model.named_parameters()}
        out[precision] = w.step()
        changed = [n for n, p in w.model.named_parameters() if not torch.equal(full(p), before[n])]
        assert len(changed) == len(before)
        assert len(w.fp8_modules) == (21 if precision == Precision.fp8 else 0)
        D.teardown()
    bf16, fp8 = out[Precision.bf16], out[Precision.fp8]
    torch.testing.assert_close(fp8.loss, bf16.loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(fp8.grad_norm, bf16.grad_norm, rtol=0.1, atol=0)

    w = Workload(TINY, dataclasses.replace(s, fp8=dataclasses.replace(ALL, fsdp_fp8_all_gather=True)),
                 CPU, precision=Precision.fp8)  # fmt: skip
    weights = [m.weight._local_tensor for m in w.model.modules() if hasattr(m, "forward_with_weight")
               and m.config.enable_fsdp_float8_all_gather]  # fmt: skip
    # all but the 3 o_proj (KHA-MLP's W_down is folded into them)
    assert len(weights) == 18 and all(t._precomputed_scale is None for t in weights)
    assert torch.isfinite(w.step().loss)
    assert all(t._precomputed_scale is not None for t in weights)
    precompute_fp8_scales(nn.Linear(2, 2))  # any other model: nothing happens


def test_a_run_resumes_across_bf16_and_fp8(tmp_path: Path, tiny_dataset: Path) -> None:
    """The trainer, 3 steps in one precision, then 3 more from its checkpoint in the other."""
    fp8 = {"precision": "fp8"}
    opts = {"fp8": {"min_dim": 16, "emulate": True}}
    for first, then in ((fp8, {"precision": "bf16"}), ({"precision": "bf16"}, fp8)):
        run = tmp_path / first["precision"]
        cfg = tiny_config(run, tiny_dataset, train={**first, "max_steps": 3}, parallel=opts)
        train_here(cfg)
        cfg = tiny_config(run, tiny_dataset, train={**then, "max_steps": 6}, parallel=opts,
                          checkpoint={"resume": "auto"})  # fmt: skip
        train_here(cfg)
        got = losses(run)
        assert sorted(got) == [1, 2, 3, 4, 5, 6] and all(v == v for v in got.values())
        assert got[6] < got[1]


def test_the_settings_line_names_the_fp8_recipe() -> None:
    from kha_train.training.parallel import settings_line

    cfg = Config()
    cfg.train.precision = Precision.fp8
    assert settings_line(cfg, "cuda", 1).endswith("precision fp8 (tensorwise, dims >= 1024)")
    cfg.parallel.fp8.fsdp_fp8_all_gather = True
    assert "FP8 all-gather" in settings_line(cfg, "cuda", 1)


def test_the_benchmark_compares_precisions_and_reports_failed_runs() -> None:
    from kha_train.bench import BenchSettings, build_arg_parser
    from kha_train.bench.cli import format_table

    args = build_arg_parser().parse_args(["--precision", "bf16,fp8", "--fp8-min-dim", "512"])
    assert args.precision == "bf16,fp8" and args.fp8_min_dim == 512
    assert args.fp8_recipe == "tensorwise" and not args.fp8_all_gather
    s = BenchSettings(fp8=Fp8Config(min_dim=512))
    assert s.parallel_config().fp8 == Fp8Config(min_dim=512)

    def row(precision: str, tps: float, **extra: object) -> dict[str, object]:
        return {"variant": "kha", "precision": precision, "params_b": 6.1, "active_b": 1.0,
                "step_ms": 32768 / tps * 1e3, "tokens_per_s": tps, "tflops": 400.0,
                "mfu": 0.4, "peak_mem_gib": 110.0, "fp8_linears": 36 * (precision == "fp8"),
                "sync_check": "ok", **extra}  # fmt: skip

    text = format_table([row("bf16", 40000.0), row("fp8", 46000.0)], s)
    assert "FP8 speed-up (kha): tokens/s x1.1500 over bf16" in text
    assert "dims >= 512" in text
    failed = {"variant": "kha", "precision": "fp8", "params_b": 6.1, "active_b": 1.0,
              "error": "OutOfMemoryError: CUDA out of memory"}  # fmt: skip
    text = format_table([row("bf16", 40000.0), failed], s)
    assert "failed: OutOfMemoryError" in text and "FP8 speed-up" not in text


# -- the bench's FP8 check ------------------------------------------------------------------------


def test_the_bench_check_compares_the_first_step_losses() -> None:
    """`kha-train bench --precision bf16,fp8`'s check: same seed, weights and tokens, so the first
    step's FP8 loss is bf16's up to FP8 rounding (emulated here, the same casts and scales)."""
    from kha_train.bench import BenchSettings
    from kha_train.bench.cli import FP8_FIRST_LOSS_RTOL, fp8_numerics_line
    from kha_train.bench.workload import Workload

    s = BenchSettings(seq_len=16, micro_batch=2, accum=2, fp8=ALL)
    first = {}
    try:
        for precision in (Precision.bf16, Precision.fp8):
            w = Workload(TINY, s, CPU, precision=precision)
            assert len(w.fp8_modules) == (0 if precision == Precision.bf16 else 21)
            first[precision.value] = {"first_loss": float(w.step().loss)}
            D.teardown()
    finally:
        D.teardown()
    rel = abs(first["fp8"]["first_loss"] / first["bf16"]["first_loss"] - 1)
    assert 0 < rel < FP8_FIRST_LOSS_RTOL, rel  # rounded, not broken
    assert fp8_numerics_line("kha", first["bf16"], first["fp8"]).endswith(": ok")
    broken = {"first_loss": first["bf16"]["first_loss"] * 1.1}  # e.g. a mis-scaled GEMM
    assert "FAILED" in fp8_numerics_line("kha", first["bf16"], broken)


def test_fp8_trains_without_fsdp2_and_resumes_into_it(tmp_path: Path, tiny_dataset: Path) -> None:
    """parallel.single_device with emulated FP8: the converted projections compute from the
    flat bf16 weights, the run trains, and its checkpoint resumes on the FSDP2 path."""
    run = tmp_path / "run"
    opts = {"fp8": {"min_dim": 16, "emulate": True}, "single_device": True}
    fp8 = {"precision": "fp8"}
    cfg = tiny_config(run, tiny_dataset, train={**fp8, "max_steps": 3}, parallel=opts)
    trainer = train_here(cfg)
    assert type(trainer.optimizer).__name__ == "FlatAdamW"
    assert sum(hasattr(m, "forward_with_weight") for m in trainer.model.modules()) > 0
    cfg = tiny_config(run, tiny_dataset, train={**fp8, "max_steps": 6},
                      parallel={**opts, "single_device": False}, checkpoint={"resume": "auto"})  # fmt: skip
    train_here(cfg)
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and all(v == v for v in got.values())
