"""The benchmark's settings (``BenchSettings``) and the trainer's parallel settings they map to.
Imports no torch: the CLI builds them before anything heavy is loaded."""

from __future__ import annotations

import dataclasses

from kha_train.config import ACMode, Fp8Config, LossKernel, ParallelConfig


@dataclasses.dataclass
class BenchSettings:
    seq_len: int = 4096
    micro_batch: int = 4
    accum: int = 1  # micro-batches per optimizer step
    steps: int = 10  # timed optimizer steps
    warmup: int = 3
    compile: bool | None = None  # parallel.compile; None: the trainer's default (on with CUDA)
    ac: ACMode = ACMode.none
    ac_every_n: int = 2
    peak_tflops: float = 989.0
    profile: bool = True
    sync_check: bool = True
    # FSDP2 reshard_after_forward; None: the trainer's default (off on one GPU)
    reshard: bool | None = None
    defer_sync: bool = True  # parallel.defer_grad_sync: one gather and one reduce per step
    loss_chunk: int | None = None  # tokens per LM-head + loss chunk (None: the model's default)
    compile_loss: bool = True  # torch.compile the LM-head + loss chunk (Transformer.compile_loss)
    loss_kernel: LossKernel = LossKernel.chunked  # parallel.loss_kernel
    # fsdp: the trainer's FSDP2 mixed precision | single: parallel.single_device (no FSDP2,
    # flat buffers, FlatAdamW) | autocast: fp32 weights + autocast
    mode: str = "fsdp"
    # parallel.fp8: which projections run FP8 GEMMs when a variant runs in precision fp8
    fp8: Fp8Config = dataclasses.field(default_factory=Fp8Config)

    def parallel_config(self) -> ParallelConfig:
        """The trainer's parallel settings these stand for (FSDP2 ones unused in autocast)."""
        return ParallelConfig(
            activation_checkpointing=self.ac,
            ac_every_n=self.ac_every_n,
            compile=self.compile,
            reshard_after_forward=self.reshard,
            defer_grad_sync=self.defer_sync,
            compile_loss=self.compile_loss,
            loss_kernel=self.loss_kernel,
            fp8=self.fp8,
            single_device=self.mode == "single",
        )
