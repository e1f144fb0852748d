"""Shared fixtures of the data tests: a small real-text corpus, a tokenizer, prepared datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from data_helpers import corpus_docs, write_jsonl

from kha_train.data.prepare import PrepareOptions, prepare_dataset
from kha_train.data.shards import DatasetIndex
from kha_train.data.sources import SourceSpec
from kha_train.data.tokenizer import (
    LoadedTokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="session")
def docs() -> list[str]:
    return corpus_docs()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = corpus_docs(2000)
    tok = train_tokenizer(texts, 600)
    return save_tokenizer(
        tok,
        tmp_path_factory.mktemp("tok") / "tokenizer.json",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )


@pytest.fixture(scope="session")
def tok(tokenizer_path: Path) -> LoadedTokenizer:
    return load_tokenizer(tokenizer_path)


Prepare = Callable[..., DatasetIndex]


@pytest.fixture
def prepare(tokenizer_path: Path) -> Prepare:
    """prepare(source, out, **options) with progress off and the test tokenizer by default."""

    def run(source: str | Path, out: Path, source_kw: dict | None = None, **kw) -> DatasetIndex:
        kw.setdefault("tokenizer", str(tokenizer_path))
        kw.setdefault("progress", False)
        spec = SourceSpec(spec=str(source), **(source_kw or {}))
        return prepare_dataset(spec, PrepareOptions(out=str(out), **kw))

    return run


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    """A prepared dataset in 4+ train shards with a val split (shared by the loader tests)."""
    root = tmp_path_factory.mktemp("ds")
    src = write_jsonl(root / "src.jsonl", corpus_docs())
    opts = PrepareOptions(
        out=str(root / "out"), tokenizer=str(tokenizer_path), val_fraction=0.2,
        shard_tokens=4000, progress=False,
    )  # fmt: skip
    prepare_dataset(SourceSpec(spec=str(src)), opts)
    return root / "out"
