"""The ``data`` section: the prepared dataset a run reads and how."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    dataset: str = "???"  # directory written by `kha-train data prepare` (holds index.json)
    seq_len: int = 2048  # tokens per sample; each sample reads seq_len + 1 tokens
    seed: int = 1234  # seed of the per-epoch shuffle of the global sample order
    tokenizer: str | None = None  # if set, its hash must match the dataset's (catches mixups)
    prefetch: int = 2  # micro-batches prepared ahead by a background thread (0: synchronous)
    # Train data never read: "steps:FIRST-LAST" (the batches optimizer steps FIRST..LAST, 1-based,
    # would take, counted from the run's data position when the range is first applied) or
    # "samples:FIRST-LAST" (global sample indices: positions in the shuffled global order,
    # docs/data.md); both inclusive, a single number for one step or sample. The loader state in
    # each checkpoint holds the resolved ranges (with those rollbacks add, train.rollback), so a
    # resume stays exact; the run's config.yaml lists them all as samples: ranges, so a rerun
    # from it reads the same data. Ranges already trained on cannot be added on a resume.
    skip_ranges: list[str] = field(default_factory=list)
