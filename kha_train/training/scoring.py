"""Scoring documents with a model: the NLL of every predicted token, by sliding windows.

Every document is scored alone: the first token has no prediction, every later token and the
final EOS is predicted from its prefix. A document longer than the window is read by windows of
``window`` tokens, each ``stride`` after the last, the last one ending at the document's end;
each token is scored once, by the first window that reaches it, with between
``window - stride`` and ``window - 1`` tokens of left context. Windows of many documents are
batched, padded on the right (attention is causal and MoE routing per token, so padding changes
nothing before it); the padded positions carry no target.

The model gives each position's NLL itself (``model(inputs, labels, reduction="none")``, fp32,
computed chunk by chunk): no [B, T, V] logits tensor, and FSDP2's forward hooks gather sharded
weights as in training. Used by ``kha-train eval`` (tools/evaluate.py, one process, batches of
similar length) and the trainer's in-loop evaluation (evaluator.py, every rank, one fixed batch
shape so a compiled model is not recompiled).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from kha_train.config import ConfigError
from kha_train.data.documents import Document
from kha_train.model.loss import IGNORE_INDEX

FLUSH_BATCHES = 8  # score_documents gathers documents until their windows fill this many batches


class Window(NamedTuple):
    """The model reads tokens [start, end) of document ``doc`` and scores tokens [first, end)."""

    doc: int
    start: int
    end: int
    first: int


def check_window(
    window: int, stride: int, names: tuple[str, str] = ("--window", "--stride")
) -> None:
    """Refuse a window that cannot score or a stride that leaves tokens unscored; ``names``:
    the options they came from, for the message."""
    if window < 2:
        raise ConfigError(f"{names[0]} must be >= 2 tokens, got {window}")
    if not 1 <= stride < window:
        raise ConfigError(
            f"{names[1]} {stride} must be in [1, window={window}): a window must overlap the "
            "previous one by at least one token, or the token where it starts goes unscored"
        )


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """How a document of ``n`` tokens is read: ``(start, end, first)`` per window, the model
    reading tokens [start, end) and scoring tokens [first, end) (token t predicted from the
    tokens before it in the window). Every token but the first is scored exactly once."""
    if n <= window:
        return [(0, n, 1)]
    out = [(0, window, 1)]
    end = window
    while end < n:
        new_end = min(end + stride, n)
        out.append((new_end - window, new_end, end))
        end = new_end
    return out


def plan_windows(docs: Sequence[Sequence[int]], window: int, stride: int) -> list[Window]:
    """Every window of every document with at least one token to predict, in document order."""
    check_window(window, stride)
    return [
        Window(i, *w)
        for i, ids in enumerate(docs)
        if len(ids) >= 2
        for w in sliding_windows(len(ids), window, stride)
    ]


def batch_windows(windows: Sequence[Window], rows: int) -> list[list[Window]]:
    """Consecutive groups of ``rows`` windows (the last one may be shorter)."""
    return [list(windows[i : i + rows]) for i in range(0, len(windows), rows)]


def window_tensors(
    docs: Sequence[Sequence[int]], batch: Sequence[Window], length: int, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``, each [rows, length] int64 on the CPU: window r of ``batch`` in row
    r, padded on the right; ``labels[r, p]`` is the token position p predicts where that token
    is scored, else IGNORE_INDEX. Rows past ``len(batch)`` are all padding (no targets)."""
    rows = len(batch) if rows is None else rows
    inputs = torch.zeros(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    for r, (i, s, e, f) in enumerate(batch):
        ids = torch.as_tensor(docs[i][s:e], dtype=torch.long)
        inputs[r, : e - s] = ids
        # Position p predicts token s + p + 1: tokens [f, e) come from positions [f-s-1, e-s-1).
        labels[r, f - s - 1 : e - s - 1] = ids[f - s :]
    return inputs, labels


@torch.no_grad()
def token_nll(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows, length] fp32 NLL of each position's target (0 where there is none), on the
    model's device."""
    device = next(model.parameters()).device
    return model(inputs.to(device), labels.to(device), reduction="none")


# -- whole documents (kha-train eval) --------------------------------------------------------


@dataclass
class DocScore:
    nll: float  # summed over the scored tokens, nats
    tokens: int  # scored tokens (predictions)
    nbytes: int
    token_nll: torch.Tensor | None = None  # [tokens] fp32: the NLL of tokens 1..n-1 in order


def score_documents(
    model: nn.Module,
    docs: Iterable[Document | Sequence[int]],
    *,
    window: int,
    stride: int,
    batch_tokens: int = 16384,
    bf16: bool = False,
    keep_token_nll: bool = False,
) -> Iterator[DocScore]:
    """The NLL of every scored token of each document, in document order (see the module
    docstring). ``docs``: :class:`Document`s, or bare id lists (then ``nbytes`` is 0). Documents
    without a token to predict are skipped."""
    check_window(window, stride)
    group: list[Document] = []
    tokens = 0
    for d in docs:
        doc = d if isinstance(d, Document) else Document(list(d), 0)
        if len(doc.ids) < 2:
            continue
        group.append(doc)
        tokens += len(doc.ids)
        if tokens >= FLUSH_BATCHES * batch_tokens:
            yield from _score_group(
                model, group, window, stride, batch_tokens, bf16, keep_token_nll
            )
            group, tokens = [], 0
    if group:
        yield from _score_group(model, group, window, stride, batch_tokens, bf16, keep_token_nll)


def _score_group(
    model: nn.Module,
    docs: list[Document],
    window: int,
    stride: int,
    batch_tokens: int,
    bf16: bool,
    keep: bool,
) -> Iterator[DocScore]:
    device = next(model.parameters()).device
    ids = [d.ids for d in docs]
    nll = [torch.zeros(len(d.ids) - 1, dtype=torch.float32) for d in docs]  # token t at t - 1
    jobs = sorted(plan_windows(ids, window, stride), key=lambda w: w.end - w.start, reverse=True)
    b = 0  # similar lengths batched together (longest first): little padding
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        while b < len(jobs):
            T = jobs[b].end - jobs[b].start
            batch = jobs[b : b + max(1, batch_tokens // T)]
            b += len(batch)
            out = token_nll(model, *window_tensors(ids, batch, T)).cpu()  # (B, T)
            for r, (i, s, e, f) in enumerate(batch):
                nll[i][f - 1 : e - 1] = out[r, f - s - 1 : e - s - 1]
    for d, x in zip(docs, nll):
        yield DocScore(float(x.double().sum()), len(x), d.nbytes, x if keep else None)
