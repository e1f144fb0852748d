"""In-loop evaluation: loss and bits per byte of named held-out texts (``eval.sets``), every
``eval.every`` steps and at the end of a run.

The texts are read and tokenized once, when the trainer starts (before any model exists, so a
missing file or a tokenizer mismatch fails in seconds): up to ``eval.max_tokens`` tokens of
whole documents per set (a fixed random sample of them by default, ``eval.pick``), each scored
alone by sliding windows exactly as ``kha-train eval`` scores it (training/scoring.py), so an
in-loop figure equals the command's on the same documents.

Every batch has the same shape, ``eval.batch_rows`` windows x ``eval.window`` tokens (the
micro-batch and the context of training by default): a compiled model compiles the eval forward
once, and padding rows/positions carry no target. Rank r scores batches r, r + ranks, ...; ranks
with fewer batches run an empty one, because FSDP2's forward is a collective that every rank
must enter equally often. One all-reduce of the NLL sums per evaluation.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kha_train.config import Config, EvalPick
from kha_train.data.documents import (
    Document,
    dataset_document_lengths,
    dataset_documents,
    source_documents,
)
from kha_train.data.errors import DataError
from kha_train.data.shards import DatasetIndex, read_index
from kha_train.data.sources import SourceSpec, resolve_local_files
from kha_train.data.tokenizer import TOKENIZER_FILE, LoadedTokenizer, load_tokenizer
from kha_train.training.scoring import batch_windows, plan_windows, token_nll, window_tensors


@dataclass
class EvalSet:
    """One named text, ready to score: its batches as CPU tensors, and what they add up to."""

    name: str
    path: str
    docs: int
    tokens: int  # scored tokens (predictions)
    nbytes: int  # UTF-8 bytes of the text those tokens spell
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (inputs, labels), [rows, window] each


class Evaluator:
    """Scores every set on this rank's share of batches; :meth:`evaluate` is a collective."""

    def __init__(
        self, sets: list[EvalSet], rows: int, window: int, rank: int, world_size: int
    ) -> None:
        self.sets = sets
        self.rank, self.world_size = rank, world_size
        self.empty = window_tensors([], [], window, rows)  # the batch of a rank with none left

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """``{"<name>/loss", "<name>/bpb", "<name>/tokens", ..., "seconds"}`` for every set, the
        same on every rank."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        sums = torch.zeros(len(self.sets), dtype=torch.float64, device=device)
        model.eval()
        try:
            for k, s in enumerate(self.sets):
                mine = s.batches[self.rank :: self.world_size]
                for j in range(math.ceil(len(s.batches) / self.world_size)):
                    inputs, labels = mine[j] if j < len(mine) else self.empty
                    sums[k] += token_nll(model, inputs, labels).double().sum()
        finally:
            model.train()
        if self.world_size > 1:
            dist.all_reduce(sums)
        out: dict[str, Any] = {}
        for s, nll in zip(self.sets, sums.tolist()):
            out[f"{s.name}/loss"] = nll / s.tokens
            out[f"{s.name}/bpb"] = nll / (math.log(2) * s.nbytes) if s.nbytes else None
            out[f"{s.name}/tokens"] = s.tokens
        out["seconds"] = time.perf_counter() - start
        return out


def build_evaluator(
    cfg: Config, index: DatasetIndex, rank: int = 0, world_size: int = 1
) -> Evaluator | None:
    """Read and tokenize every ``eval.sets`` text (None when there are none). ``index``: the
    run's training dataset, whose tokenizer the texts must share."""
    e = cfg.eval
    if not e.sets:
        return None
    window = e.window or cfg.data.seq_len
    stride = e.stride if e.stride is not None else window // 2
    rows = e.batch_rows or cfg.train.micro_batch_size
    tok = run_tokenizer(cfg, index)
    with tempfile.TemporaryDirectory(prefix="kha-eval-") as work:
        sets = [
            _load_set(name, spec, cfg, index, tok, work, window, stride, rows)
            for name, spec in e.sets.items()
        ]
    return Evaluator(sets, rows, window, rank, world_size)


def run_tokenizer(cfg: Config, index: DatasetIndex) -> LoadedTokenizer:
    """The tokenizer the run's dataset was prepared with (``data.tokenizer``, else the
    tokenizer.json the dataset holds), with the dataset's EOS."""
    path = Path(cfg.data.tokenizer) if cfg.data.tokenizer else index.directory / TOKENIZER_FILE
    if not path.exists():
        raise DataError(
            f"eval.sets needs the run's tokenizer to read its texts, but {path} does not exist: "
            "set data.tokenizer to the tokenizer.json data.dataset was prepared with"
        )
    return load_tokenizer(path, index.raw["tokenizer"].get("eos_token"))


def _load_set(
    name: str, spec: str, cfg: Config, run_index: DatasetIndex, tok: LoadedTokenizer,
    work: str, window: int, stride: int, rows: int,
) -> EvalSet:  # fmt: skip
    path = Path(spec)
    is_prepared = (path / "index.json").is_file()
    if is_prepared:  # a prepared dataset: its val split
        index = read_index(path)
        if index.tokenizer_hash != run_index.tokenizer_hash:
            raise DataError(
                f"eval.sets.{name}={spec} was prepared with tokenizer {index.tokenizer_hash}, the "
                f"run's data with {run_index.tokenizer_hash}: its token ids mean other text to "
                f"this model. Give the raw text instead (eval.sets.{name}=FILE), or prepare it "
                f"with --tokenizer {tok.path}"
            )
        val = index.splits.get("val")
        if val is None or val.tokens == 0:
            raise DataError(
                f"eval.sets.{name}={spec} has no val split to evaluate on: prepare it with "
                "--val-fraction > 0, or give the raw text (eval.sets.<name>=FILE)"
            )

        def read(keep: set[int] | None = None) -> Iterator[Document]:
            return dataset_documents(index, "val", tok, keep=keep)
    else:
        try:
            resolve_local_files(spec)  # missing / empty / unsupported files: one error now
        except DataError as err:
            raise DataError(f"eval.sets.{name}: {err}") from err
        source = SourceSpec(spec=spec, text_field=cfg.eval.text_field)

        def read(keep: set[int] | None = None) -> Iterator[Document]:
            docs = enumerate(source_documents(source, tok, work))
            return (d for i, d in docs if keep is None or i in keep)

    if cfg.eval.pick == EvalPick.first:
        taken = list(_until_tokens(read(), cfg.eval.max_tokens))
    elif is_prepared:  # the documents' lengths without decoding, then only the sample decoded
        lengths = dataset_document_lengths(index, "val")
        taken = list(read(set(sample_documents(lengths, cfg.eval.max_tokens))))
    else:
        taken = _sample_raw(read(), cfg.eval.max_tokens, read)
    if not taken:
        raise DataError(
            f"eval.sets.{name}={spec} holds no document with a token to predict: check the path"
            + ("" if is_prepared else " and eval.text_field")
        )
    ids = [d.ids for d in taken]
    windows = plan_windows(ids, window, stride)
    batches = [window_tensors(ids, b, window, rows) for b in batch_windows(windows, rows)]
    return EvalSet(
        name, spec, len(taken), sum(len(d) - 1 for d in ids), sum(d.nbytes for d in taken),
        batches,
    )  # fmt: skip


def _sample_raw(
    docs: Iterable[Document], max_tokens: int, reread: Callable[[set[int]], Iterable[Document]]
) -> list[Document]:
    """:func:`sample_documents` of a raw-text set, read once to count its documents. A set of
    at most ``max_tokens`` tokens is kept as it is read (the sample is all of it); a larger one
    is read (tokenized) a second time for the sampled documents only, so memory stays bounded."""
    lengths: list[int] = []
    held: list[Document] | None = []
    total = 0
    for d in docs:
        lengths.append(len(d.ids))
        total += len(d.ids)
        if total > max_tokens:
            held = None  # too large to hold: read again below
        elif held is not None:
            held.append(d)
    picked = sample_documents(lengths, max_tokens)
    return [held[i] for i in picked] if held is not None else list(reread(set(picked)))


def sample_documents(lengths: Sequence[int], max_tokens: int, seed: int = 0) -> list[int]:
    """Positions (ascending) of a fixed random sample of whole documents, drawn until
    ``max_tokens`` tokens are taken (all of them when the set holds no more); ``lengths``: each
    document's tokens, EOS included. Documents with no token to predict are passed over."""
    import numpy as np

    taken, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(lengths)).tolist():
        if lengths[i] < 2:
            continue
        taken.append(i)
        total += lengths[i]
        if total >= max_tokens:
            break
    return sorted(taken)


def _until_tokens(docs: Iterable[Document], max_tokens: int) -> Iterator[Document]:
    """Whole documents with a token to predict, until ``max_tokens`` tokens are taken."""
    total = 0
    for d in docs:
        if len(d.ids) < 2:
            continue
        yield d
        total += len(d.ids)
        if total >= max_tokens:
            return
