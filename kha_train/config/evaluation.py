"""The ``eval`` section: in-loop evaluation on held-out texts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EvalPick(enum.StrEnum):
    # A fixed random sample of the set's whole documents (the same in every run). A set's
    # documents are often grouped by source (a prepared val split holds them in corpus order),
    # so its first documents can be one kind of text only. A raw-text set larger than
    # max_tokens is tokenized twice: once to count its documents, once to read the sample.
    sample = "sample"
    first = "first"  # the set's first documents (cheaper for a large raw text; older runs' rule)


@dataclass
class EvalConfig:
    """In-loop evaluation (training/evaluator.py): loss and bits per byte of held-out texts,
    scored like `kha-train eval` (documents alone, long ones by a sliding window)."""

    # name -> text: raw text (.txt / .jsonl / .parquet, optionally .gz, a folder or a glob;
    # tokenized with the run's tokenizer) or a prepared dataset directory (its val split, which
    # must share the run's tokenizer). Logged as eval/<name>/loss and eval/<name>/bpb. {}: off.
    sets: dict[str, str] = field(default_factory=dict)
    every: int = 1000  # steps between evaluations (also one at the end); 0: only at the end
    max_tokens: int = 1_000_000  # per set: whole documents are taken until this many tokens
    pick: EvalPick = EvalPick.sample  # which documents, when a set holds more than max_tokens
    window: int | None = None  # tokens the model reads at once (default data.seq_len)
    stride: int | None = None  # tokens between sliding windows in [1, window) (default window/2)
    batch_rows: int | None = None  # windows per forward pass (default train.micro_batch_size)
    text_field: str = "text"  # column of .jsonl / .parquet sets
