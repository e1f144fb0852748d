"""The on-disk token format: flat shards plus a JSON index (docs/data.md describes it).

A prepared dataset directory holds::

    index.json            what is in the directory (written last: its presence means complete)
    train_00000.bin ...   flat token ids (uint16 if the vocab fits, else uint32), little-endian;
    val_00000.bin ...     every document followed by EOS, documents back to back
    shard_00000.json ...  per-shard records written by prepare as each shard completes (resume)

A split is the concatenation of its shards in index order; :class:`TokenStream` reads it as one
flat array through memory maps.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kha_train.data.errors import DataError

INDEX_FILE = "index.json"
FORMAT = "kha-train-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
ID_CHECK_TOKENS = 1 << 20  # tokens per shard whose ids are range-checked when a dataset is opened


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab size {vocab_size} does not fit in uint32 token ids")


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name inside the dataset directory
    tokens: int
    docs: int


@dataclass(frozen=True)
class SplitInfo:
    shards: tuple[ShardInfo, ...]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def docs(self) -> int:
        return sum(s.docs for s in self.shards)


@dataclass(frozen=True)
class DatasetIndex:
    directory: Path
    tokenizer_hash: str
    vocab_size: int  # token ids are in [0, vocab_size)
    eos_id: int
    dtype: np.dtype
    splits: dict[str, SplitInfo]
    raw: dict[str, Any]  # the whole index.json (settings, source, counts)

    @property
    def path(self) -> Path:
        return self.directory / INDEX_FILE

    @property
    def fingerprint(self) -> str:
        return dataset_fingerprint(self.raw)


def dataset_fingerprint(index: dict[str, Any]) -> str:
    """Identifies the token content: tokenizer, dtype, source and every shard's name and size."""
    content = {
        "tokenizer_hash": index["tokenizer"]["hash"],
        "dtype": index["dtype"],
        "source": index["source"]["fingerprint"],
        "splits": {
            name: [[s["file"], s["tokens"], s["docs"]] for s in split["shards"]]
            for name, split in index["splits"].items()
        },
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def read_index(directory: str | os.PathLike[str]) -> DatasetIndex:
    """Read and check ``<directory>/index.json``; every problem is a :class:`DataError` that names
    the file and the fix."""
    directory = Path(directory)
    fix = f"run `kha-train data prepare --out {directory} ...`"
    if not directory.exists():
        raise DataError(
            f"dataset directory {directory} does not exist: {fix} (or fix data.dataset)"
        )
    path = directory / INDEX_FILE
    if not path.is_file():
        raise DataError(
            f"{directory} has no {INDEX_FILE}: it is not a prepared dataset, or its preparation "
            f"did not finish; {fix} (re-running resumes where it stopped)"
        )
    corrupt = f"{path} is corrupt"
    redo = f"delete it and re-run `kha-train data prepare --out {directory} ...` (finished shards are kept)"
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{corrupt} (not valid JSON: {e}): {redo}") from e
    try:
        if raw.get("format") != FORMAT:
            raise ValueError(f"'format' is {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"format version {raw.get('version')!r}; this kha-train reads {FORMAT_VERSION}"
            )
        tok = raw["tokenizer"]
        vocab_size, eos_id = int(raw["vocab_size"]), int(tok["eos_id"])
        dtype = np.dtype(raw["dtype"])
        if dtype not in (np.uint16, np.uint32) or vocab_size > np.iinfo(dtype).max + 1:
            raise ValueError(f"dtype {raw['dtype']} cannot hold vocab size {vocab_size}")
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the vocab [0, {vocab_size})")
        splits = {}
        for name, split in raw["splits"].items():
            if name not in SPLITS:
                raise ValueError(f"unknown split {name!r}")
            shards = tuple(
                ShardInfo(str(s["file"]), int(s["tokens"]), int(s["docs"])) for s in split["shards"]
            )
            if any(s.tokens < 0 or "/" in s.file or s.file.startswith(".") for s in shards):
                raise ValueError(f"a shard entry of split {name!r} is malformed")
            splits[name] = SplitInfo(shards)
        str(raw["source"]["fingerprint"])
        index = DatasetIndex(directory, str(tok["hash"]), vocab_size, eos_id, dtype, splits, raw)
        index.fingerprint  # noqa: B018 (checks the keys it reads)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise DataError(f"{corrupt} ({what}): {redo}") from e
    return index


class TokenStream:
    """One split as a single flat token array over memory-mapped shards.

    Opening checks that every shard exists and has exactly the size the index records (a
    truncated shard is an error, never silently short data), and range-checks the first
    ``ID_CHECK_TOKENS`` ids of each shard; :meth:`read` range-checks what it returns.
    """

    def __init__(self, index: DatasetIndex, split: str) -> None:
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        info = index.splits.get(split)
        if info is None or info.tokens == 0:
            hint = " (prepare with --val-fraction > 0)" if split == "val" else ""
            raise DataError(
                f"{index.path} has no {split} tokens{hint}: re-run `kha-train data prepare` "
                f"with a source that yields {split} documents"
            )
        self.index, self.split = index, split
        self.paths: list[Path] = []
        self._maps: list[np.ndarray] = []
        starts = [0]
        for shard in info.shards:
            if shard.tokens == 0:
                continue
            path = index.directory / shard.file
            self._check_size(path, shard.tokens)
            self.paths.append(path)
            self._maps.append(np.memmap(path, dtype=index.dtype.newbyteorder("<"), mode="r"))
            starts.append(starts[-1] + shard.tokens)
            self._check_ids(self._maps[-1][:ID_CHECK_TOKENS], path)
        self._starts = starts  # _starts[i] = global position of shard i's first token
        self.num_tokens = starts[-1]

    def _check_size(self, path: Path, tokens: int) -> None:
        fix = (
            f"re-run `kha-train data prepare --out {self.index.directory} ...` with the original "
            "source and tokenizer: it rewrites only the damaged shards"
        )
        if not path.is_file():
            raise DataError(f"shard {path} listed in {self.index.path} is missing: {fix}")
        expected = tokens * self.index.dtype.itemsize
        actual = path.stat().st_size
        if actual != expected:
            state = "truncated" if actual < expected else "longer than recorded"
            raise DataError(
                f"shard {path} is {state}: {actual} bytes, but {self.index.path} records "
                f"{tokens} {self.index.dtype} tokens = {expected} bytes. The file was damaged or "
                f"replaced; {fix}"
            )

    def _check_ids(self, ids: np.ndarray, path: Path | str) -> None:
        if ids.size and int(ids.max()) >= self.index.vocab_size:
            raise DataError(
                f"shard {path} holds token id {int(ids.max())}, outside the vocab "
                f"[0, {self.index.vocab_size}) recorded in {self.index.path}: the shard was "
                "written with another tokenizer or is corrupt; re-prepare the dataset"
            )

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split as a fresh int64 array (crossing shards if needed)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        out = np.empty(stop - start, dtype=np.int64)
        i = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            lo = pos - self._starts[i]
            hi = min(stop, self._starts[i + 1]) - self._starts[i]
            piece = self._maps[i][lo:hi]
            self._check_ids(piece, self.paths[i])
            out[pos - start : pos - start + hi - lo] = piece
            pos += hi - lo
            i += 1
        return out


def write_shard(path: Path, arrays: list[np.ndarray], dtype: np.dtype) -> int:
    """Write the concatenation of ``arrays`` to ``path`` through a temporary name (renamed only
    once complete and synced, so a crash never leaves a shard a later run would trust). Returns
    the token count."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        for a in arrays:
            f.write(np.ascontiguousarray(a, dtype=dtype.newbyteorder("<")).tobytes())
            n += len(a)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return n


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
