"""What a run is built from: the model (shared with the benchmark), the data loaders, the resume
point and the config snapshot saved beside the checkpoints.

``build_model`` follows torchtitan's recipe: model on the meta device -> parallelize (FP8
conversion with precision=fp8, AC, compile, FSDP2) -> allocate -> seeded ``init_weights`` whose
result does not depend on the number of ranks (``init_weights_like_single_device``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kha_train.config import (
    Config,
    ConfigError,
    LossKernel,
    ModelConfig,
    ParallelConfig,
    Precision,
    to_dict,
    to_yaml,
)
from kha_train.data.loader import PackedLoader
from kha_train.model import Transformer
from kha_train.training.activation_checkpoint import apply_activation_checkpointing
from kha_train.training.checkpoint import complete_checkpoints, resolve_resume
from kha_train.training.distributed import DistEnv
from kha_train.training.flat_params import apply_single_device
from kha_train.training.fp8 import convert_to_fp8
from kha_train.training.parallel import (
    apply_compile,
    compiles,
    init_weights_like_single_device,
    parallelize,
)


def build_model(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    precision: Precision,
    device: torch.device,
    *,
    seed: int,
    compile_loss: bool = True,
    fsdp: bool = True,
) -> Transformer:
    """The model, parallelized, on ``device``, initialised from ``seed``, in train mode
    (with ``parallel.single_device``: one process, no FSDP2, weights in flat buffers).

    ``compile_loss``: compile the LM head + loss chunk kernel on CUDA (``Transformer.
    compile_loss``). ``fsdp=False`` leaves out FSDP2 (FP8 conversion, AC and compile still
    apply): plain fp32 parameters, for the benchmark's autocast baseline; ``precision`` then only
    says whether to convert to FP8."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.compile_loss = compile_loss
    model.loss_kernel = LossKernel(parallel.loss_kernel).value
    if fsdp:
        parallelize(model, parallel, precision, device)
    else:
        if precision == Precision.fp8:
            convert_to_fp8(model, parallel.fp8, device)
        apply_activation_checkpointing(model, parallel)
        if compiles(parallel, device):
            apply_compile(model)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with init_weights_like_single_device():
        model.init_weights()
    if fsdp and parallel.single_device:
        apply_single_device(model)  # bf16 weights in flat buffers, fp32 masters beside them
    return model.train()


@dataclass
class Loaders:
    train: PackedLoader
    val: PackedLoader | None  # None: the dataset has no val split big enough
    val_batches: int  # micro-batches per rank of a validation pass


def build_loaders(cfg: Config, env: DistEnv) -> Loaders:
    """This rank's train loader and, if the val split holds one micro-batch on every rank, its
    val loader. The dataset's vocab (and tokenizer, if ``data.tokenizer`` is set) are checked
    against the config here, before any model exists."""
    where = dict(rank=env.rank, world_size=env.world_size, device=env.device)
    train = PackedLoader.from_config(cfg, "train", **where)
    # Validation needs one full micro-batch on every rank: (seq_len + 1) tokens per sample.
    val_split = train.index.splits.get("val")
    need = (cfg.data.seq_len * cfg.train.micro_batch_size * env.world_size) + 1
    if val_split is None or val_split.tokens < need or cfg.train.val_batches == 0:
        return Loaders(train, None, 0)
    val = PackedLoader.from_config(cfg, "val", **where)
    # A small val split caps the pass (said once at startup, not at every pass).
    return Loaders(train, val, min(cfg.train.val_batches, val.num_eval_batches))


def resume_path(resume: str, ckpt_dir: Path) -> Path | None:
    """The checkpoint ``checkpoint.resume`` names (None: start fresh); refuses to start a fresh
    run over an earlier run's checkpoints."""
    path = resolve_resume(resume, ckpt_dir)
    existing = complete_checkpoints(ckpt_dir)
    if resume == "none" and existing:
        raise ConfigError(
            f"{ckpt_dir} already holds checkpoints of an earlier run (newest: step "
            f"{existing[-1][0]}). Continue it with checkpoint.resume=auto, or start a new run "
            "elsewhere (logging.run_dir=... or checkpoint.dir=...), or delete that folder"
        )
    return path


def config_snapshot(cfg: Config) -> tuple[str, dict[str, Any]]:
    """The resolved config as YAML text and as a plain dict."""
    return to_yaml(cfg), to_dict(cfg)
