"""Scoring documents for `kha-train eval` (evaluate.py): sliding windows over long documents,
batched forwards, per-token NLL in fp32, and the report (loss, perplexity, bits per byte).

Every document is scored alone: the first token has no prediction, every later token and the
final EOS is predicted from its prefix. A document longer than the window is read by windows of
``window`` tokens, each ``stride`` after the last, the last one ending at the document's end;
each token is scored once, by the first window that reaches it. Windows of many documents are
batched, padded on the right (attention is causal and MoE routing per token, so padding changes
nothing before it).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kha_train.config import Config

FLUSH_BATCHES = 8  # documents are gathered until their windows fill this many batches


@dataclass
class Document:
    """One document as the model reads it, and the bytes of the text its scored tokens spell."""

    ids: list[int]  # token ids, ending with EOS
    nbytes: int


def check_window(window: int, stride: int) -> None:
    from kha_train.config import ConfigError

    if window < 2:
        raise ConfigError(f"--window must be >= 2 tokens, got {window}")
    if not 1 <= stride < window:
        raise ConfigError(
            f"--stride {stride} must be in [1, window={window}): a window must overlap the "
            "previous one by at least one token, or the token where it starts goes unscored"
        )


# -- scoring ---------------------------------------------------------------------------------


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
    docstring). ``docs``: :class:`Document`s, or bare id lists (then ``nbytes`` is 0)."""
    check_window(window, stride)
    group: list[Document] = []
    tokens = 0
    for d in docs:
        doc = d if isinstance(d, Document) else Document(list(d), 0)
        if len(doc.ids) < 2:
            continue  # nothing to predict
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
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    ids = [torch.tensor(d.ids, dtype=torch.long) for d in docs]
    nll = [torch.zeros(len(d.ids) - 1, dtype=torch.float32) for d in docs]  # token t at t - 1
    jobs = [
        (i, *w) for i, d in enumerate(docs) for w in sliding_windows(len(d.ids), window, stride)
    ]
    jobs.sort(key=lambda j: j[2] - j[1], reverse=True)  # similar lengths together: less padding
    b = 0
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        while b < len(jobs):
            T = jobs[b][2] - jobs[b][1]
            batch = jobs[b : b + max(1, batch_tokens // T)]
            b += len(batch)
            inputs = torch.zeros(len(batch), T, dtype=torch.long)  # right padding: never read
            for r, (i, s, e, _) in enumerate(batch):
                inputs[r, : e - s] = ids[i][s:e]
            logits = model(inputs.to(device))  # (B, T, V)
            for r, (i, s, e, f) in enumerate(batch):
                # Position p predicts token s + p + 1: tokens [f, e) come from positions [f-s-1, e-s-1).
                row = logits[r, f - s - 1 : e - s - 1].float()
                target = ids[i][f:e].to(device)
                nll[i][f - 1 : e - 1] = F.cross_entropy(row, target, reduction="none").cpu()
    for d, x in zip(docs, nll):
        yield DocScore(float(x.double().sum()), len(x), d.nbytes, x if keep else None)


# -- results ---------------------------------------------------------------------------------


def figures(nll: float, tokens: int, nbytes: int) -> dict[str, Any]:
    """Loss (mean NLL per token, nats), perplexity and bits per byte of a sum of NLLs."""
    loss = nll / tokens if tokens else float("nan")
    return {
        "tokens": tokens,
        "bytes": nbytes,
        "nll": nll,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bpb": nll / (math.log(2) * nbytes) if nbytes else None,
    }


@dataclass
class SourceResult:
    name: str
    kind: str
    path: str
    split: str | None
    docs: int = 0
    tokens: int = 0
    nbytes: int = 0
    nll: float = 0.0
    per_doc: list[dict[str, Any]] = field(default_factory=list)

    def add(self, i: int, s: DocScore, per_doc: bool = False) -> None:
        self.docs += 1
        self.tokens += s.tokens
        self.nbytes += s.nbytes
        self.nll += s.nll
        if per_doc:
            self.per_doc.append({"doc": i, **figures(s.nll, s.tokens, s.nbytes)})

    def to_dict(self, per_doc: bool) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "path": self.path, "split": self.split,
               "docs": self.docs, **figures(self.nll, self.tokens, self.nbytes)}  # fmt: skip
        if per_doc:
            out["per_doc"] = self.per_doc
        return out


def build_report(
    ckpt: Path, cfg: Config, settings: dict[str, Any], results: list[SourceResult], per_doc: bool
) -> dict[str, Any]:
    from kha_train.training.checkpoint_checks import STEP_DIR

    m = STEP_DIR.match(ckpt.name)
    totals = SourceResult("overall", "all", "", None)
    for r in results:
        totals.docs += r.docs
        totals.tokens += r.tokens
        totals.nbytes += r.nbytes
        totals.nll += r.nll
    overall = totals.to_dict(False)
    for key in ("name", "kind", "path", "split"):
        overall.pop(key)
    return {
        "model": {
            "checkpoint": str(ckpt),
            "step": int(m.group(1)) if m and ckpt.is_dir() else None,
            "name": cfg.name,
            "vocab_size": cfg.model.vocab_size,
        },
        "settings": settings,
        "sources": [r.to_dict(per_doc) for r in results],
        "overall": overall,
    }


def print_report(report: dict[str, Any], per_doc: bool = False, file: Any = None) -> None:
    file = file or sys.stdout
    m, st = report["model"], report["settings"]
    step = f" (step {m['step']})" if m["step"] is not None else ""
    print(
        f"eval {m['checkpoint']}{step}: window {st['window']}, stride {st['stride']}, "
        f"{st['device']} {st['precision']}",
        file=file,
    )
    rows = [(s["name"], s) for s in report["sources"]] + [("overall", report["overall"])]
    width = max(len(n) for n, _ in rows)
    head = f"{'source':<{width}}  {'docs':>7}  {'tokens':>11}  {'bytes':>12}  {'loss':>7}  "
    print(head + f"{'ppl':>9}  {'bpb':>6}", file=file)
    for name, s in rows:
        print(f"{name:<{width}}  {_line(s)}", file=file)
        if per_doc and "per_doc" in s:
            for d in s["per_doc"]:
                print(f"{'  doc ' + str(d['doc']):<{width}}  {_line({**d, 'docs': 1})}", file=file)


def _line(s: dict[str, Any]) -> str:
    bpb = f"{s['bpb']:6.4f}" if s["bpb"] is not None else f"{'-':>6}"
    return (
        f"{s['docs']:>7,}  {s['tokens']:>11,}  {s['bytes']:>12,}  {s['loss']:7.4f}  "
        f"{s['perplexity']:9.3f}  {bpb}"
    )


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` atomically (a temporary file, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
