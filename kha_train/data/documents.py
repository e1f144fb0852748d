"""Documents to score, as the model reads them: token ids (ending with EOS) and the UTF-8 bytes
of the text the scored tokens spell (the denominator of bits per byte).

Three places text comes from: raw texts tokenized here (:func:`text_documents`), a raw-text
source of ``kha_train.data.sources`` (:func:`source_documents`: .txt, .jsonl, .parquet, globs),
and the split of a prepared dataset cut at its EOS tokens (:func:`dataset_documents`). Each
document is laid out as in prepared data (its tokens, then EOS); with ``score_first`` an EOS is
put in front too (the boundary the model saw in packed training), so its first token is
predicted and every byte of the text counts. Used by ``kha-train eval`` and the trainer's
in-loop evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from kha_train.data.shards import DatasetIndex
    from kha_train.data.tokenizer import LoadedTokenizer

ENCODE_BATCH = 256  # raw-text documents tokenized per call
READ_TOKENS = 1 << 20  # tokens read from a prepared split per call


@dataclass
class Document:
    """One document as the model reads it, and the bytes of the text its scored tokens spell."""

    ids: list[int]  # token ids, ending with EOS
    nbytes: int


def _scored_bytes(tok: LoadedTokenizer, ids: Sequence[int], total: int, score_first: bool) -> int:
    """Bytes of the text the scored tokens spell: all of it, or all but the first token's."""
    if score_first or not ids:
        return total
    first = len(tok.decode(ids[:1]).encode("utf-8"))
    return max(total - first, 0)


def text_documents(
    texts: Iterable[str], tok: LoadedTokenizer, *, score_first: bool = False
) -> Iterator[Document]:
    """Raw texts tokenized as ``data prepare`` does (ids + EOS, no special-token template);
    bytes from the text itself."""
    batch: list[str] = []

    def flush() -> Iterator[Document]:
        for text, ids in zip(batch, tok.encode_batch(batch)):
            nbytes = _scored_bytes(tok, ids, len(text.encode("utf-8")), score_first)
            yield Document(([tok.eos_id] if score_first else []) + ids + [tok.eos_id], nbytes)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= ENCODE_BATCH:
            yield from flush()
    yield from flush()


def source_documents(
    spec: Any,
    tok: LoadedTokenizer,
    work_dir: str | os.PathLike[str] | None,
    *,
    score_first: bool = False,
    max_docs: int | None = None,
) -> Iterator[Document]:
    """The non-empty documents of a raw-text source (kha_train.data.sources), tokenized."""
    import tempfile

    from kha_train.data.sources import iter_texts, open_source, progress_bars

    progress_bars(False)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="kha-eval-"))
    opened = open_source(spec, work)
    yield from text_documents(iter_texts(opened, max_docs), tok, score_first=score_first)


def dataset_documents(
    index: DatasetIndex,
    split: str,
    tok: LoadedTokenizer,
    *,
    score_first: bool = False,
    max_docs: int | None = None,
    keep: Container[int] | None = None,
) -> Iterator[Document]:
    """The documents of a prepared split: the token stream cut after every EOS. Bytes: each
    document decoded without its EOS (EOS spells no text). ``keep``: only the documents of
    these positions in the split (the others are not decoded)."""
    n = 0
    for i, ids in enumerate(_split_token_docs(index, split)):
        if max_docs is not None and n >= max_docs:
            return
        if keep is None or i in keep:
            yield _dataset_document(ids.tolist(), tok, index.eos_id, score_first)
            n += 1


def dataset_document_lengths(index: DatasetIndex, split: str) -> list[int]:
    """The token count (EOS included) of every document of a prepared split, in order, found
    without decoding any text."""
    return [len(ids) for ids in _split_token_docs(index, split)]


def _split_token_docs(index: DatasetIndex, split: str) -> Iterator[np.ndarray]:
    """The token ids of each document of a prepared split: the stream cut after every EOS."""
    import numpy as np

    from kha_train.data.shards import TokenStream

    stream = TokenStream(index, split)
    carry = np.empty(0, dtype=np.int64)
    for start in range(0, len(stream), READ_TOKENS):
        ids = np.concatenate([carry, stream.read(start, min(start + READ_TOKENS, len(stream)))])
        ends = np.flatnonzero(ids == index.eos_id) + 1
        lo = 0
        for hi in ends.tolist():
            yield ids[lo:hi]
            lo = hi
        carry = ids[lo:]
    if len(carry):  # a stream not ending with EOS
        yield carry


def _dataset_document(
    ids: list[int], tok: LoadedTokenizer, eos: int, score_first: bool
) -> Document:
    body = ids[:-1] if ids and ids[-1] == eos else ids
    total = len(tok.decode(body).encode("utf-8"))
    nbytes = _scored_bytes(tok, body, total, score_first)
    return Document(([eos] if score_first else []) + ids, nbytes)
