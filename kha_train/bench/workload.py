"""What the benchmark times: the trainer's model, optimizer and optimizer step on random tokens.

``Workload`` builds the model with the trainer's ``build_model`` and ``build_optimizer`` and
runs the trainer's ``train_step`` (``kha_train/training/step.py``): per-token loss weights,
deferred gradient sync, global grad-norm clipping folded into the fused AdamW, the device-side
non-finite skip and the MoE bias update from the step's expert counts (real, unforced routing).
Only the data differs: random micro-batches of the loader's ``Batch`` type, and a constant lr.

``mode="autocast"`` is the documented baseline of docs/performance.md: fp32 parameters on one
device without FSDP2, bf16 compute under ``torch.autocast``, the same step.
"""

from __future__ import annotations

import torch

from kha_train.bench.settings import BenchSettings
from kha_train.config import ModelConfig, OptimConfig, Precision
from kha_train.data.loader import Batch
from kha_train.training.build import build_model
from kha_train.training.grad_parts import GradParts
from kha_train.training.optim import build_optimizer
from kha_train.training.step import StepResult, train_step


def random_batches(
    vocab_size: int, micro_batch: int, seq_len: int, device: torch.device, n: int = 4
) -> list[Batch]:
    """``n`` distinct micro-batches (so nothing is cached between them) of random tokens, laid
    out as the packed loader's: labels are the next tokens, every position has a target."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for j in range(n):
        tokens = torch.randint(
            0, vocab_size, (micro_batch, seq_len + 1), device=device, generator=g
        )  # (B, T+1)
        x = tokens[:, :-1].contiguous()  # (B, T)
        out.append(
            Batch(
                input_ids=x,
                labels=tokens[:, 1:].contiguous(),
                doc_ids=torch.zeros_like(x),
                positions=torch.arange(seq_len, device=device).expand_as(x).contiguous(),
                sample_ids=torch.arange(j * micro_batch, (j + 1) * micro_batch, device=device),
            )
        )
    return out


class Workload:
    """A model + optimizer as the trainer builds them, and :meth:`step`, the trainer's step.

    ``precision``, ``optim`` and ``seed`` default to the benchmark's (bf16, AdamW fused at
    lr 3e-4 with clip 1.0, seed 0); a test passes a run's to compare with the trainer. With
    precision fp8 the projections ``s.fp8`` selects run FP8 GEMMs (``fp8_modules``)."""

    def __init__(
        self,
        mcfg: ModelConfig,
        s: BenchSettings,
        device: torch.device,
        *,
        precision: Precision = Precision.bf16,
        optim: OptimConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.cfg, self.s, self.device = mcfg, s, device
        self.autocast = s.mode == "autocast"
        self.pcfg = s.parallel_config()
        self.model = build_model(
            mcfg, self.pcfg, precision, device, seed=seed, compile_loss=s.compile_loss,
            fsdp=not self.autocast,
        )  # fmt: skip
        if s.loss_chunk:
            self.model.loss_chunk_tokens = s.loss_chunk
        # The projections that run FP8 GEMMs (precision fp8; none otherwise).
        self.fp8_modules = [
            n for n, m in self.model.named_modules() if hasattr(m, "forward_with_weight")
        ]
        self.optim = optim or OptimConfig(lr=3e-4, implementation="fused")
        self.opt = build_optimizer(self.model, self.optim, device)
        self.parts = GradParts(self.model)  # the trainer's step splits its grad norm too
        self.batches = random_batches(mcfg.vocab_size, s.micro_batch, s.seq_len, device)
        self._i = 0
        self.top_kernels: list[tuple[str, float, int]] = []  # filled by profile_breakdown

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(batch.input_ids, batch.labels)

    def next_micro_batches(self) -> list[Batch]:
        """The next ``accum`` micro-batches, cycling through the random ones."""
        out = [self.batches[(self._i + i) % len(self.batches)] for i in range(self.s.accum)]
        self._i += self.s.accum
        return out

    def step(self, micro_batches: list[Batch] | None = None) -> StepResult:
        """One optimizer step (the trainer's), on ``micro_batches`` or the next random ones."""
        return train_step(
            self.model, self.opt, micro_batches or self.next_micro_batches(),
            parallel=self.pcfg, grad_clip=self.optim.grad_clip, lr=self.optim.lr,
            compute_loss=self.compute_loss, parts=self.parts,
        )  # fmt: skip
