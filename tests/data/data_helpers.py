"""Helpers of the data tests (a module of its own: `conftest` is not importable by name when
several test folders have one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kha_train.data.shards import DatasetIndex


def corpus_docs(n: int = 240) -> list[str]:
    """Real English documents of varied length: paragraphs of the pydoc topics."""
    from pydoc_data.topics import topics

    paras = [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n")]
    paras = [p for p in paras if len(p) > 40]
    return paras[:n]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d, "other": 1}) + "\n")
    return path


def read_split(index: DatasetIndex, split: str) -> np.ndarray:
    """All tokens of a split, concatenated in index order."""
    return np.concatenate(
        [
            np.fromfile(index.directory / s.file, dtype=index.dtype)
            for s in index.splits[split].shards
        ]
    ).astype(np.int64)


def split_docs(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
    """Documents of a token stream (each ends with EOS)."""
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[a : b + 1].tolist() for a, b in zip(starts, ends)]
