"""Text sources, read through the Hugging Face ``datasets`` library.

A source spec (``--source``) is one of:

- ``builtin``: the embedded corpus (:mod:`kha_train.data.corpus`), materialised as a JSONL file.
- local files: a path, a directory (every supported file under it), a glob (``data/*.jsonl``,
  ``**`` allowed), or several of those separated by commas. Formats by extension: ``.jsonl`` /
  ``.json`` (one object per line or a JSON array), ``.parquet``, ``.txt`` (optionally ``.gz``).
  One source may mix formats: each format's files are read by their own reader, and the parts
  are joined in the order their first file appears (see :func:`open_source`).
- ``hub:NAME``: a Hugging Face Hub dataset, always streamed (``datasets.load_dataset(NAME,
  config, split=..., streaming=True)``), for machines with a network.

Every source yields documents from a text column (``text_field``, default ``text``; ``.txt``
files always use ``text``).

Progress: bars (tqdm, the ``datasets`` bars) only on a terminal; when stderr is a log file or a
pipe, :class:`ProgressLog` prints a plain line now and then instead (:func:`progress_bars`).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kha_train.data.corpus import corpus_key, write_builtin_corpus
from kha_train.data.errors import DataError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
HUB_PREFIX = "hub:"
FULL_HASH_BYTES = 256 << 20  # files up to this size are hashed whole; larger ones are sampled
SAMPLE_BYTES = 4 << 20
OWN_FILES = re.compile(r"^(index|prepare|tokenizer|tokenizer_config|shard_\d+)\.json$")
TEXT_DTYPES = ("string", "large_string")
PROGRESS_EVERY_S = 30.0  # seconds between plain progress lines when stderr is not a terminal


@dataclass
class SourceSpec:
    """Where documents come from (the ``--source`` family of command-line options)."""

    spec: str  # builtin | local path/dir/glob[,more] | hub:NAME
    text_field: str = "text"  # column holding the document text
    streaming: bool = False  # local files: read lazily instead of converting to Arrow first
    hub_config: str | None = None  # hub: the dataset's configuration (subset) name
    hub_split: str = "train"  # hub: the split to read
    hub_revision: str | None = None  # hub: a branch, tag or commit
    hub_data_files: list[str] = field(default_factory=list)  # hub: restrict to these files
    txt_sample_by: str = "document"  # .txt files: one document per file | paragraph | line


@dataclass
class OpenedSource:
    dataset: Any  # datasets.Dataset, or datasets.IterableDataset when streaming
    fingerprint: str  # identifies the source content (see source_fingerprint)
    description: str  # for messages
    num_rows: int | None  # None when streaming
    text_field: str

    @property
    def streaming(self) -> bool:
        return self.num_rows is None


def is_hub(spec: str) -> bool:
    return spec.startswith(HUB_PREFIX)


def resolve_local_files(spec: str) -> list[Path]:
    """Expand a local spec into a sorted list of files, with a clear error for anything missing
    or empty."""
    files: list[Path] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"--source glob {item!r} matches no file: check the pattern")
            files += matches
        elif os.path.isdir(item):
            found = sorted(p for p in Path(item).rglob("*") if _is_data_file(p, Path(item)))
            if not found:
                raise DataError(
                    f"--source directory {item} holds no {', '.join(FORMATS)} file: "
                    "point to the data files"
                )
            files += found
        elif os.path.isfile(item):
            files.append(Path(item))
        else:
            hint = f" (for a Hugging Face Hub dataset write hub:{item})" if "/" in item else ""
            raise DataError(f"--source path {item} does not exist{hint}")
    if not files:
        raise DataError(f"--source {spec!r} names no file")
    for f in files:
        if _format_of(f) is None:
            raise DataError(
                f"{f}: unsupported file type; use {', '.join(FORMATS)} (optionally .gz)"
            )
        if f.stat().st_size == 0:
            raise DataError(f"{f} is empty (0 bytes): remove it from --source or fill it")
    return files


def progress_bars(progress: bool) -> bool:
    """Whether to draw progress bars: only with ``progress`` on and stderr a terminal (a log file
    or pipe would get their carriage returns and escape codes). Switches the ``datasets`` bars
    (Arrow conversion, ``map``) to match."""
    import datasets

    bars = progress and _is_terminal(sys.stderr)
    if bars:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    return bars


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressLog:
    """Plain progress lines for a long step when no bar is drawn (``--no-progress`` off but
    stderr not a terminal): ``LABEL: MESSAGE (ELAPSED)``, at most one per ``every`` seconds."""

    def __init__(self, label: str, enabled: bool, every: float | None = None) -> None:
        self.label, self.enabled = label, enabled
        self.every = PROGRESS_EVERY_S if every is None else every
        self.start = self.last = time.monotonic()
        self.lines = 0  # lines printed so far

    def due(self) -> bool:
        """Whether a line is due now (build the message only then)."""
        return self.enabled and time.monotonic() - self.last >= self.every

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        self.last = now = time.monotonic()
        self.lines += 1
        line = f"{self.label}: {message} ({_duration(now - self.start)})"
        print(line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    h, m, s = int(seconds) // 3600, int(seconds) // 60 % 60, int(seconds) % 60
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _is_data_file(path: Path, root: Path) -> bool:
    """In a directory source: supported files, minus hidden ones and the files kha-train itself
    writes (a prepared dataset's index, shard records and tokenizer are not text)."""
    rel = path.relative_to(root).parts
    if any(part.startswith(".") for part in rel) or OWN_FILES.match(path.name):
        return False
    return path.is_file() and _format_of(path) is not None


def _format_of(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return FORMATS.get(suffixes[-1]) if suffixes else None


def source_fingerprint(spec: SourceSpec, files: list[Path] | None) -> str:
    """Local files: their names (relative to their common folder), sizes and contents (files
    over 256 MiB are sampled: head, tail and 8 blocks between). Hub: name, config, split,
    revision and data files (the Hub content itself cannot be hashed without reading it all)."""
    h = hashlib.sha256()
    if files is None:
        h.update(repr(("hub", spec.spec, spec.hub_config, spec.hub_split, spec.hub_revision,
                       sorted(spec.hub_data_files))).encode())  # fmt: skip
    else:
        root = Path(os.path.commonpath([f.resolve().parent for f in files]))
        for f in files:
            h.update(f"{f.resolve().relative_to(root).as_posix()}\0{f.stat().st_size}\0".encode())
            h.update(_content_digest(f))
    return h.hexdigest()[:16]


def _content_digest(path: Path) -> bytes:
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        else:
            for i in range(10):
                f.seek(min(size - SAMPLE_BYTES, i * (size - SAMPLE_BYTES) // 9))
                h.update(f.read(SAMPLE_BYTES))
    return h.digest()


def source_key(spec: SourceSpec) -> str:
    """The fingerprint of a source without opening it (cheap for builtin and hub sources)."""
    if is_hub(spec.spec):
        return source_fingerprint(spec, None)
    if spec.spec == "builtin":
        return corpus_key()
    return source_fingerprint(spec, resolve_local_files(spec.spec))


def open_source(
    spec: SourceSpec, work_dir: str | os.PathLike[str], fingerprint: str | None = None
) -> OpenedSource:
    """Open ``spec`` as a ``datasets`` dataset. ``work_dir`` holds the materialised builtin corpus
    (``builtin_source/``) and the Arrow cache of local files (``.hf_cache/``). ``fingerprint``:
    a :func:`source_key` already computed for ``spec``.

    Local files of one format are read by one ``load_dataset`` call, with all their columns. A
    source that mixes formats is read per format (files of a format together, formats in the
    order their first file appears), each part cut to its text column (``text`` for ``.txt``)
    renamed ``spec.text_field``, and the parts concatenated."""
    import datasets

    work_dir = Path(work_dir)
    cache_dir = str(work_dir / ".hf_cache")
    if is_hub(spec.spec):
        name = spec.spec[len(HUB_PREFIX) :]
        if not name:
            raise DataError("--source hub: needs a dataset name, e.g. hub:HuggingFaceFW/fineweb")
        try:
            ds = datasets.load_dataset(
                name,
                spec.hub_config,
                split=spec.hub_split,
                streaming=True,
                revision=spec.hub_revision,
                data_files=spec.hub_data_files or None,
            )
        except Exception as e:
            raise DataError(
                f"could not open Hub dataset {name!r} (config {spec.hub_config}, split "
                f"{spec.hub_split}): {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
                "Check the name, --hub-config and --hub-split, and that this machine can reach "
                "the Hub (or download the files and pass them as a local --source)"
            ) from e
        files, text_field = None, spec.text_field
    else:
        if spec.spec == "builtin":
            files = [write_builtin_corpus(work_dir / "builtin_source")]
        else:
            files = resolve_local_files(spec.spec)
        groups: dict[str, list[Path]] = {}  # format -> its files, formats in order of appearance
        for f in files:
            groups.setdefault(_format_of(f), []).append(f)  # type: ignore[arg-type]
        text_field = spec.text_field
        if "text" in groups and spec.txt_sample_by not in ("document", "paragraph", "line"):
            raise DataError(
                f"--txt-sample-by must be document, paragraph or line, got {spec.txt_sample_by!r}"
            )
        if len(groups) == 1:
            ((fmt, group),) = groups.items()
            ds = _load_files(fmt, group, spec, cache_dir)
            if fmt == "text":
                text_field = "text"  # the datasets text builder's only column
        else:
            # Each format read by its own reader, cut to its text column under one name, joined.
            parts = [
                _text_part(_load_files(fmt, group, spec, cache_dir), fmt, group, text_field)
                for fmt, group in groups.items()
            ]
            ds = datasets.concatenate_datasets(parts)
        if fingerprint is None:
            fingerprint = (
                corpus_key() if spec.spec == "builtin" else source_fingerprint(spec, files)
            )
    description = spec.spec if files is None else _describe_files(files)
    columns = ds.column_names  # None for some streaming datasets until the first row is read
    if columns is not None and text_field not in columns:
        raise DataError(
            f"{description} has no column {text_field!r} (its columns: {columns}): pass "
            "--text-field with the column that holds the text"
        )
    if fingerprint is None:
        fingerprint = source_fingerprint(spec, None)
    num_rows = None if isinstance(ds, datasets.IterableDataset) else len(ds)
    return OpenedSource(ds, fingerprint, description, num_rows, text_field)


def _describe_files(files: list[Path]) -> str:
    return f"{', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}"


def _load_files(fmt: str, files: list[Path], spec: SourceSpec, cache_dir: str) -> Any:
    """``datasets.load_dataset`` of local files of one format. The log lines ``datasets`` writes
    while a file fails to parse are folded into the one error raised here."""
    import datasets

    kwargs: dict[str, Any] = {"sample_by": spec.txt_sample_by} if fmt == "text" else {}
    with _CapturedLogs("datasets") as logs:
        try:
            ds = datasets.load_dataset(
                fmt,
                data_files=[str(f) for f in files],
                split="train",
                streaming=spec.streaming,
                cache_dir=cache_dir,
                **kwargs,
            )
        except Exception as e:
            logs.drop()
            bad = next((str(f) for f in files for m in logs.messages if str(f) in m), None)
            shape = " (one object per line, or one JSON array)" if fmt == "json" else ""
            raise DataError(
                f"could not read {bad or _describe_files(files)} as {fmt}: {_root_cause(e)}. "
                f"Check that the files are valid {fmt}{shape} and that all files of one format "
                "share one schema"
            ) from e
    return ds


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost explicit cause of ``e`` (``datasets`` wraps the parser
    error that says what is wrong in a generic one). Implicit contexts are not followed: they
    are earlier attempts (e.g. another JSON reader) whose errors say less."""
    seen = set()
    while e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _CapturedLogs:
    """Holds back the records of a logger (and its children) while a block runs; they are
    re-emitted afterwards unless :meth:`drop` was called."""

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)
        self.records: list[logging.LogRecord] = []
        self.keep = True

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def drop(self) -> None:
        self.keep = False

    def __enter__(self) -> _CapturedLogs:
        self.saved = (self.logger.handlers[:], self.logger.propagate)
        handler = logging.Handler()
        handler.emit = self.records.append  # type: ignore[method-assign]
        self.logger.handlers = [handler]
        self.logger.propagate = False
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.handlers, self.logger.propagate = self.saved
        if self.keep:
            for record in self.records:
                self.logger.handle(record)


def _text_part(ds: Any, fmt: str, files: list[Path], text_field: str) -> Any:
    """One format's part of a mixed source: its text column alone, named ``text_field``."""
    import datasets

    column = "text" if fmt == "text" else text_field
    columns = ds.column_names
    if columns is not None and column not in columns:
        raise DataError(
            f"{_describe_files(files)} has no column {column!r} (its columns: {columns}): pass "
            "--text-field with the column that holds the text (in every file of the source)"
        )
    ds = ds.select_columns([column])
    if column != text_field:
        ds = ds.rename_column(column, text_field)
    feature = (ds.features or {}).get(text_field)
    if feature is not None:
        is_text = isinstance(feature, datasets.Value) and feature.dtype in TEXT_DTYPES
        if not is_text:
            raise DataError(
                f"{_describe_files(files)}: column {text_field!r} holds {feature} values, not "
                "text: pass --text-field with a text column"
            )
        if feature.dtype != "string":
            ds = ds.cast_column(text_field, datasets.Value("string"))  # one type across parts
    return ds


def iter_texts(source: OpenedSource, max_docs: int | None = None) -> Iterator[str]:
    """Yield non-empty document texts (for tokenizer training)."""
    n = 0
    for batch in source.dataset.iter(batch_size=1000):
        if source.text_field not in batch:
            raise DataError(
                f"{source.description} has no column {source.text_field!r} (its columns: "
                f"{list(batch)}): pass --text-field with the column that holds the text"
            )
        for text in batch[source.text_field]:
            if max_docs is not None and n >= max_docs:
                return
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{source.description}: column {source.text_field!r} holds "
                    f"{type(text).__name__} values, not text: pass --text-field with a text column"
                )
            if text.strip():
                n += 1
                yield text
