"""``kha-train data prepare``: tokenize a text source into flat token shards plus an index.

Pipeline: source rows -> ``datasets.map`` (parallel over ``num_proc`` processes; streaming
sources map lazily in this process, where the Rust tokenizer still uses every core) -> each
document's ids + EOS, and whether the document is held out for validation -> a writer that packs
documents back to back into train / val buffers and cuts a shard at the first document boundary
after ``shard_tokens`` train tokens.

Validation hold-out is by whole documents: a document goes to ``val`` when a hash of its text
falls below ``val_fraction`` (so duplicated documents land in the same split), until the val
split holds ``val_max_tokens``; later documents all go to ``train``.

Crash safety and resume: each shard's ``.bin`` files are written under a temporary name and
renamed when complete, then a ``shard_NNNNN.json`` record (the commit point) names the source
rows the shard covers. A re-run with the same settings keeps every committed shard, deletes
anything after it, and continues from the next source row. Because shard boundaries depend
only on the document stream, the result is identical to an uninterrupted run. ``index.json`` is
written last.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kha_train.data.errors import DataError, ensure_writable_dir, write_error
from kha_train.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    DatasetIndex,
    dataset_fingerprint,
    read_index,
    token_dtype,
    write_json_atomic,
    write_shard,
)
from kha_train.data.sources import (
    ProgressLog,
    SourceSpec,
    open_source,
    progress_bars,
    source_key,
)
from kha_train.data.tokenizer import (
    TOKENIZER_FILE,
    LoadedTokenizer,
    load_tokenizer,
    save_tokenizer,
    training_info,
)

PROGRESS_FILE = "prepare.json"  # the settings of an unfinished run (index.json once finished)
CHUNK_ROWS = 200_000  # rows tokenized per datasets.map call: bounds the work a crash can lose
MAP_BATCH = 1000
AUTO_PARALLEL_ROWS = 20_000  # below this many rows, worker processes cost more than they save
SHARD_FILE = re.compile(r"^(?:shard|train|val)_(\d{5})\.(json|bin)(\.tmp)?$")  # ours to delete


@dataclass
class PrepareOptions:
    out: str  # output directory (holds index.json when done)
    tokenizer: str  # tokenizer.json or a local Hugging Face tokenizer directory
    eos_token: str | None = None  # default: from the tokenizer (see load_tokenizer)
    val_fraction: float = 0.05  # fraction of documents held out for validation (by text hash)
    val_max_tokens: int | None = 10_000_000  # stop holding out once val has this many tokens
    shard_tokens: int = 100_000_000  # train tokens per shard (cut at the next document end)
    num_proc: int | None = None  # tokenizing processes; None: all cores for large sources
    max_docs: int | None = None  # read only the first N source rows (quick experiments)
    dtype: str | None = None  # uint16 | uint32; None: uint16 when the vocab fits
    progress: bool = True  # bars on a terminal, plain lines in a log; False: results only


def prepare_dataset(source: SourceSpec, opts: PrepareOptions) -> DatasetIndex:
    """Tokenize ``source`` into ``opts.out``; returns the finished index. Idempotent: a finished
    directory with the same settings is left as it is."""
    out = Path(opts.out)
    _check_options(opts)
    tok = load_tokenizer(opts.tokenizer, opts.eos_token)
    dtype = _choose_dtype(tok, opts.dtype)
    fingerprint = source_key(source)
    settings = {
        "source_fingerprint": fingerprint,
        "text_field": source.text_field,
        "txt_sample_by": source.txt_sample_by,
        "tokenizer_hash": tok.hash,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "val_fraction": opts.val_fraction,
        "val_max_tokens": opts.val_max_tokens,
        "shard_tokens": opts.shard_tokens,
        "max_docs": opts.max_docs,
    }
    ensure_writable_dir(out, "--out")
    try:
        return _prepare_into(out, source, opts, tok, dtype, fingerprint, settings)
    except OSError as e:
        # A full disk, lost permission, ... while writing: one line naming the file and the fix.
        if e.filename and _is_inside(e.filename, out):
            raise write_error(e, "--out") from e
        raise


def _is_inside(path: str | os.PathLike[str], folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


def _prepare_into(
    out: Path,
    source: SourceSpec,
    opts: PrepareOptions,
    tok: LoadedTokenizer,
    dtype: np.dtype,
    fingerprint: str,
    settings: dict[str, Any],
) -> DatasetIndex:
    done = _finished_index(out, settings)
    if done is not None:
        print(  # a result: shown with --no-progress too
            f"{out / INDEX_FILE} is up to date ({done.splits['train'].tokens:,} train tokens)",
            file=sys.stderr,
        )
        return done
    _check_progress_file(out, settings)
    write_json_atomic(out / PROGRESS_FILE, {"settings": settings})
    records = _committed_shards(out, dtype)
    if not records or not records[-1].get("final"):
        _tokenize_rest(source, opts, out, tok, dtype, fingerprint, records)
    index = _write_index(out, source, opts, tok, dtype, settings, records)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    shutil.rmtree(out / ".hf_cache", ignore_errors=True)
    _copy_tokenizer(tok, out, opts)
    t, v = index.splits["train"], index.splits["val"]
    print(  # the result: shown with --no-progress too
        f"wrote {out}: train {t.tokens:,} tokens / {t.docs:,} docs in {len(t.shards)} "
        f"shard(s), val {v.tokens:,} tokens / {v.docs:,} docs, {dtype.name}",
        file=sys.stderr,
    )
    return index


def _check_options(opts: PrepareOptions) -> None:
    if not 0 <= opts.val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if opts.shard_tokens <= 0:
        raise DataError(f"--shard-tokens must be positive, got {opts.shard_tokens}")
    if opts.num_proc is not None and opts.num_proc < 1:
        raise DataError(f"--num-proc must be >= 1, got {opts.num_proc}")
    if opts.max_docs is not None and opts.max_docs < 1:
        raise DataError(f"--max-docs must be >= 1, got {opts.max_docs}")
    if opts.val_max_tokens is not None and opts.val_max_tokens < 0:
        raise DataError(f"--val-max-tokens must be >= 0, got {opts.val_max_tokens}")


def _choose_dtype(tok: LoadedTokenizer, requested: str | None) -> np.dtype:
    auto = token_dtype(tok.vocab_size)
    if requested is None:
        return auto
    if requested not in ("uint16", "uint32"):
        raise DataError(f"--dtype must be uint16 or uint32, got {requested!r}")
    dtype = np.dtype(requested)
    if tok.vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(
            f"--dtype {requested} cannot hold the ids of {tok.path} (vocab {tok.vocab_size}): "
            "use --dtype uint32 or leave --dtype unset"
        )
    return dtype


def _settings_conflict(out: Path, file: str, old: dict[str, Any], new: dict[str, Any]) -> DataError:
    diff = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
    return DataError(
        f"{out / file} was written with other settings ({diff}). Use a new --out directory, or "
        f"delete {out} to re-prepare it with these settings"
    )


def _finished_index(out: Path, settings: dict[str, Any]) -> DatasetIndex | None:
    """The existing index if it is complete, intact and made with ``settings``."""
    if not (out / INDEX_FILE).is_file():
        return None
    try:
        index = read_index(out)
    except DataError:
        (out / INDEX_FILE).unlink()  # corrupt: rebuilt below from the committed shard records
        return None
    old = index.raw.get("settings", {})
    if old != settings:
        raise _settings_conflict(out, INDEX_FILE, old, settings)
    for split in index.splits.values():
        for shard in split.shards:
            path = out / shard.file
            if not path.is_file() or path.stat().st_size != shard.tokens * index.dtype.itemsize:
                (out / INDEX_FILE).unlink()  # damaged shard: resume rewrites from it
                return None
    return index


def _check_progress_file(out: Path, settings: dict[str, Any]) -> None:
    import json

    path = out / PROGRESS_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())["settings"]
    except (ValueError, KeyError, TypeError):
        return  # a damaged progress file only holds settings we are about to rewrite
    # Without a committed shard the old settings produced nothing worth keeping.
    if old != settings and any(out.glob("shard_*.json")):
        raise _settings_conflict(out, PROGRESS_FILE, old, settings)


def _shard_names(k: int) -> tuple[str, str, str]:
    return f"shard_{k:05d}.json", f"train_{k:05d}.bin", f"val_{k:05d}.bin"


def _committed_shards(out: Path, dtype: np.dtype) -> list[dict[str, Any]]:
    """Records of the leading run of intact shards; every later shard file and temporary file is
    deleted (they belong to an interrupted or damaged write)."""
    import json

    records: list[dict[str, Any]] = []
    while True:
        meta, *_ = _shard_names(len(records))
        try:
            rec = json.loads((out / meta).read_text())
            ok = rec["index"] == len(records) and all(
                (out / part["file"]).is_file()
                and (out / part["file"]).stat().st_size == part["tokens"] * dtype.itemsize
                for part in (rec["train"], rec["val"])
                if part["tokens"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            break
        records.append(rec)
    for path in out.iterdir():
        m = SHARD_FILE.match(path.name)
        if m and (m.group(3) or int(m.group(1)) >= len(records)) and path.is_file():
            path.unlink()
    return records


def _val_threshold(fraction: float) -> int:
    return int(fraction * 2**64)


def tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: Any,
    text_field: str,
    eos_id: int,
    val_threshold: int,
    row_offset: int,
    description: str,
) -> dict[str, list]:
    """``datasets.map`` function: ids + EOS per document (empty for empty documents) and whether
    the document is held out (hash of its text below ``val_threshold``)."""
    texts = batch[text_field]
    for i, t in zip(indices, texts):
        if t is not None and not isinstance(t, str):
            raise DataError(
                f"{description}: row {row_offset + i}, column {text_field!r} holds a "
                f"{type(t).__name__} ({str(t)[:40]!r}), not text: pass --text-field with the "
                "column that holds the text"
            )
    texts = [t if t is not None and t.strip() else "" for t in texts]
    encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [[*e.ids, eos_id] if t else [] for e, t in zip(encoded, texts)]
    val = [
        int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
        < val_threshold
        for t in texts
    ]
    return {"ids": ids, "val": val}


def _tokenized_batches(source: Any, opts: PrepareOptions, tok: LoadedTokenizer, start: int):
    """Yield (ids per row, val flag per row) for source rows from ``start`` on, in order."""
    ds = source.dataset
    end = source.num_rows
    if opts.max_docs is not None:
        end = opts.max_docs if end is None else min(end, opts.max_docs)
    fn_kwargs = dict(
        tokenizer=tok.tokenizer,
        text_field=source.text_field,
        eos_id=tok.eos_id,
        val_threshold=_val_threshold(opts.val_fraction),
        description=source.description,
    )
    if source.streaming:
        stream = ds.skip(start) if start else ds
        if end is not None:
            stream = stream.take(end - start)
        mapped = stream.map(
            tokenize_batch,
            batched=True,
            batch_size=MAP_BATCH,
            with_indices=True,
            fn_kwargs={**fn_kwargs, "row_offset": start},
        )
        yield from _arrow_batches(mapped.select_columns(["ids", "val"]))
        return
    assert end is not None
    num_proc = opts.num_proc or (
        1 if end - start < AUTO_PARALLEL_ROWS else min(16, os.cpu_count() or 1)
    )
    if num_proc > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the worker processes are the parallelism
    for a in range(start, end, CHUNK_ROWS):
        b = min(a + CHUNK_ROWS, end)
        part = ds.select(range(a, b))
        mapped = part.map(
            tokenize_batch,
            batched=True,
            batch_size=MAP_BATCH,
            with_indices=True,
            fn_kwargs={**fn_kwargs, "row_offset": a},
            remove_columns=part.column_names,
            # None, not 1: datasets >= 5 starts a worker pool for any num_proc >= 1, and forking
            # a process that holds threads (tqdm's monitor, torch's pools) can deadlock.
            num_proc=min(num_proc, b - a) if num_proc > 1 else None,
            new_fingerprint=f"{source.fingerprint}-{tok.hash}-{a}-{b}",
            desc=f"tokenizing rows {a:,}-{b:,}",
        )
        yield from _arrow_batches(mapped)
        files = [f["filename"] for f in mapped.cache_files]
        del mapped
        for f in files:  # free the disk the tokenized copy used as soon as it is written out
            Path(f).unlink(missing_ok=True)


def _arrow_batches(mapped: Any):
    for table in mapped.with_format("arrow").iter(batch_size=MAP_BATCH):
        col = table.column("ids").combine_chunks()
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)
        flags = table.column("val").to_pylist()
        yield [values[offsets[i] : offsets[i + 1]] for i in range(len(flags))], flags


class _ShardWriter:
    """Packs documents into train/val buffers and commits a shard per ``shard_tokens``."""

    def __init__(
        self,
        out: Path,
        opts: PrepareOptions,
        tok: LoadedTokenizer,
        dtype: np.dtype,
        records: list[dict[str, Any]],
    ) -> None:
        self.out, self.opts, self.tok, self.dtype, self.records = out, opts, tok, dtype, records
        self.row = records[-1]["doc_end"] if records else 0  # next source row
        self.val_tokens = sum(r["val"]["tokens"] for r in records)
        self._reset()

    def _reset(self) -> None:
        self.first_row = self.row
        self.bufs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        self.tokens = {"train": 0, "val": 0}
        self.skipped = 0

    def add(self, ids: np.ndarray, held_out: bool) -> None:
        self.row += 1
        if len(ids) == 0:
            self.skipped += 1
            return
        if int(ids.max()) >= self.tok.vocab_size:
            raise DataError(f"{self.tok.path} produced id {int(ids.max())} >= its vocab size")
        cap = self.opts.val_max_tokens
        split = "val" if held_out and (cap is None or self.val_tokens < cap) else "train"
        self.bufs[split].append(ids.astype(self.dtype))  # the shard's dtype halves the buffer
        self.tokens[split] += len(ids)
        if split == "val":
            self.val_tokens += len(ids)
        if self.tokens["train"] >= self.opts.shard_tokens:
            self.commit(final=False)

    def commit(self, final: bool) -> None:
        k = len(self.records)
        meta, train_file, val_file = _shard_names(k)
        rec: dict[str, Any] = {
            "index": k,
            "doc_start": self.first_row,
            "doc_end": self.row,
            "skipped_empty_docs": self.skipped,
            "final": final,
        }
        for split, file in (("train", train_file), ("val", val_file)):
            if self.tokens[split]:
                write_shard(self.out / file, self.bufs[split], self.dtype)
            rec[split] = {"file": file, "tokens": self.tokens[split], "docs": len(self.bufs[split])}
        write_json_atomic(self.out / meta, rec)  # the commit point
        self.records.append(rec)
        self._reset()


def _tokenize_rest(
    source: SourceSpec,
    opts: PrepareOptions,
    out: Path,
    tok: LoadedTokenizer,
    dtype: np.dtype,
    fingerprint: str,
    records: list[dict[str, Any]],
) -> None:
    from tqdm.auto import tqdm

    bars = progress_bars(opts.progress)  # on a terminal only: a log gets plain lines instead
    log = ProgressLog("prepare", opts.progress and not bars)
    opened = open_source(source, out, fingerprint)
    writer = _ShardWriter(out, opts, tok, dtype, records)
    total = opened.num_rows
    if opts.max_docs is not None:
        total = opts.max_docs if total is None else min(total, opts.max_docs)
    if records:
        _log(
            opts,
            f"resuming {out} after {len(records)} finished shard(s) at source row {writer.row:,}",
        )
    bar = tqdm(
        total=total,
        initial=writer.row,
        unit="doc",
        desc="prepare",
        disable=not bars,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for ids, flags in _tokenized_batches(opened, opts, tok, writer.row):
            for doc, held_out in zip(ids, flags):
                writer.add(doc, held_out)
            bar.update(len(flags))
            done = sum(r["train"]["tokens"] for r in records) + writer.tokens["train"]
            bar.set_postfix(train_tokens=f"{done:,}", refresh=False)
            if log.due():
                of = f" of {total:,}" if total else ""
                pct = f" ({100 * writer.row / total:.0f}%)" if total else ""
                log.log(f"{writer.row:,}{of} rows{pct}, {done:,} train tokens")
    finally:
        bar.close()
    writer.commit(final=True)


def _write_index(
    out: Path,
    source: SourceSpec,
    opts: PrepareOptions,
    tok: LoadedTokenizer,
    dtype: np.dtype,
    settings: dict[str, Any],
    records: list[dict[str, Any]],
) -> DatasetIndex:
    splits = {
        split: {
            "tokens": sum(r[split]["tokens"] for r in records),
            "docs": sum(r[split]["docs"] for r in records),
            "shards": [r[split] for r in records if r[split]["tokens"]],
        }
        for split in ("train", "val")
    }
    if splits["train"]["tokens"] == 0:
        raise DataError(
            f"--source {source.spec} yielded no training text ({records[-1]['doc_end'] if records else 0} "
            f"rows, all empty or held out): check --source and --text-field {source.text_field!r}"
        )
    spec = asdict(source)
    spec["fingerprint"] = settings["source_fingerprint"]
    index: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "tokenizer": {
            "hash": tok.hash,
            "path": tok.path,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "eos_token": tok.eos_token,
            "pad_id": tok.pad_id,
        },
        "source": spec,
        "settings": settings,
        "source_rows": records[-1]["doc_end"],
        "skipped_empty_docs": sum(r["skipped_empty_docs"] for r in records),
        "splits": splits,
    }
    index["fingerprint"] = dataset_fingerprint(index)
    write_json_atomic(out / INDEX_FILE, index)
    return read_index(out)


def _copy_tokenizer(tok: LoadedTokenizer, out: Path, opts: PrepareOptions) -> None:
    """Keep the dataset directory self-contained: a copy of its tokenizer, unless one is there."""
    dest = out / TOKENIZER_FILE
    if not dest.exists():
        save_tokenizer(
            tok.tokenizer,
            dest,
            eos_token=tok.eos_token,
            pad_token=tok.tokenizer.id_to_token(tok.pad_id) if tok.pad_id is not None else None,
            training=training_info(tok.path),
        )
    elif load_tokenizer(dest).hash != tok.hash:
        print(
            f"warning: {dest} is not the tokenizer this dataset was prepared with "
            f"({tok.path}); the index records the right hash ({tok.hash})",
            file=sys.stderr,
        )


def _log(opts: PrepareOptions, msg: str) -> None:
    """A progress message (off with --no-progress; results and warnings are always printed)."""
    if opts.progress:
        print(msg, file=sys.stderr)
