"""The ``parallel`` section: FSDP2 / HSDP, activation checkpointing, compile and FP8."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ACMode(enum.StrEnum):
    none = "none"
    full = "full"  # checkpoint every transformer block
    every_n = "every_n"  # checkpoint every ac_every_n-th block
    # Checkpoint every block but keep its matrix products' outputs (GEMMs, attention): the
    # backward recomputes only norms, RoPE, SwiGLU and routing glue (training/activation_checkpoint.py)
    selective = "selective"


class LossKernel(enum.StrEnum):
    chunked = "chunked"  # ours (model/loss.py): chunks of logits, compiled on CUDA; any device
    liger = "liger"  # liger-kernel's fused linear cross entropy, fp32 accumulation (CUDA)
    cce = "cce"  # cut-cross-entropy (Apple), its default gradient filtering (CUDA)


class Fp8Recipe(enum.StrEnum):
    tensorwise = "tensorwise"  # one scale per tensor, cuBLAS FP8 GEMMs: the fastest
    rowwise = "rowwise"  # one scale per row, CUTLASS GEMMs: finer; slower than bf16 below 8192


@dataclass
class Fp8Config:
    """How train.precision=fp8 converts the model (training/fp8.py: torchao float8 training,
    applied by parallelize before activation checkpointing, compile and FSDP2). Converted: the
    nn.Linear projections inside the transformer blocks (attention's q/k/v/o and the other
    variants' projections, dense SwiGLU FFNs, shared experts) whose in and out features are both
    >= min_dim and multiples of 16. Never converted: the embedding, the LM head and loss, norms,
    the router, the KHA / MEA / talking-heads matrices and the routed experts (grouped GEMM)."""

    recipe: Fp8Recipe = Fp8Recipe.tensorwise  # how scales are taken (Fp8Recipe above)
    # Both dimensions at least this. 1024 converts q and o (hidden 1152 or 2048 x 4096) and
    # leaves k and v (x 512), as torchao's tensorwise heuristic would; FP8 gained 1.02-1.08x
    # at hidden 1152 and 1.23-1.31x at 2048 on an H200 (forward + backward of one GEMM).
    min_dim: int = 1024
    # FSDP2 all-gathers the converted weights in FP8 (half of bf16's bytes; tensorwise only),
    # their scales computed in one pass per step (training/step.py). Pays where parameters are
    # sharded; with one GPU there is nothing to gather. A projection whose weight has a KHA part
    # folded in (KHA-Linear's q/k/v, KHA-MLP on V's o) is gathered in bf16 still.
    fsdp_fp8_all_gather: bool = False
    # Cast to FP8 and back but multiply in high precision: runs on any device, no speed-up.
    # For CPU tests and numerics checks (skips the GPU check).
    emulate: bool = False


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # HSDP replicas (multi-node: number of nodes); 1 = plain FSDP
    dp_shard: int = -1  # ranks each replica shards over; -1 = world_size / dp_replicate
    activation_checkpointing: ACMode = ACMode.none
    ac_every_n: int = 2  # for activation_checkpointing=every_n
    # torch.compile each transformer block. null (auto): on with CUDA, where it pays (+50%
    # tokens/s on the paper's A0.44B MoE on one H200, docs/performance.md), off on CPU.
    compile: bool | None = None
    # On CUDA, torch.compile each LM-head + loss chunk (fuses its softmax passes,
    # docs/performance.md); false: eager (debugging, or where Inductor is unavailable).
    compile_loss: bool = True
    # The LM head + loss kernel (model/loss_kernels.py): chunked (ours, default), or a fused
    # linear-cross-entropy kernel from the `fast` extra, liger or cce (CUDA only). Same loss
    # and gradients to bf16 rounding (scripts/bench_loss.py measures each against ours).
    loss_kernel: LossKernel = LossKernel.chunked
    # FSDP2: free each block's gathered bf16 parameters after its forward and gather them again
    # for its backward (ZeRO-3: less memory, one more all-gather per block and micro-batch).
    # null: on when parameters are sharded, off when each rank's shard group is the rank alone
    # (one GPU, or dp_shard=1 replication), where the second "gather" is a copy that saves
    # only the bf16 copy's memory (2 bytes per parameter) at about 2% of the step's time. Turn
    # it on there when memory is tight: on one H200 the paper's main model (6.1B) ran 14.8%
    # faster with it (selective AC, micro-batch 8: 11 GiB freed, 1 allocator retry, not 6;
    # docs/performance.md).
    reshard_after_forward: bool | None = None
    # With several micro-batches per step: keep parameters gathered and gradients unsharded
    # (accumulated in fp32) until the last micro-batch, then reduce once. Saves one all-gather
    # and one reduce-scatter per micro-batch (+8.7% tokens/s on one H100, docs/performance.md);
    # costs a full-size fp32 gradient per rank. null: on when nothing is sharded (dp_shard 1:
    # one GPU, or pure replication), where it costs no memory.
    defer_grad_sync: bool | None = None
    # One process without FSDP2 (training/flat_params.py, flat_adamw.py): bf16 weights and
    # gradients in flat buffers, fp32 master weights, and AdamW as one elementwise pass per
    # weight-decay group that also writes the bf16 weights. On one GPU it skips FSDP2's casts
    # and copies (docs/performance.md has the figures). Same precision as FSDP2's except that
    # with several micro-batches per step their fp32 sum is rounded to bf16 once before the
    # update. Checkpoints are FSDP2's: runs resume across the two. Needs one process and
    # train.precision bf16 or fp8 (reshard_after_forward and defer_grad_sync then have nothing
    # to do). Memory: the bf16 weights and gradient buffer stay allocated all step (4 bytes per
    # parameter; FSDP2 frees gathered weights and fills its gradients as the backward frees
    # activations), so a model that fits only with reshard_after_forward may not fit (the A0.8B
    # at micro-batch 8 x 4 on one H200 did not).
    single_device: bool = False
    fp8: Fp8Config = field(default_factory=Fp8Config)  # read only when train.precision=fp8
