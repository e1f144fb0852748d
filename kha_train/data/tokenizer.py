"""Tokenizers: train a byte-level BPE, load one, and fingerprint it.

Special-token conventions (docs/data.md has the full story):

- **EOS** ends every document. ``kha-train data prepare`` appends it after each document, so it
  is both the "end of text" target and the document separator the loader uses to find document
  boundaries. Text is encoded with ``add_special_tokens=False``: no tokenizer post-processor
  (e.g. a BOS template) runs.
- **BOS** is not used: a sample starts wherever the packed stream is cut, and the token after an
  EOS is the first token of the next document.
- **pad** exists in the vocabulary for downstream use (fine-tuning, batched inference) but never
  appears in pretraining data: samples are packed, so nothing needs padding.

The model's ``model.vocab_size`` must be >= the tokenizer's vocabulary (added tokens included);
rows above it are padding that no data ever indexes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer

from kha_train.data.errors import DataError

if TYPE_CHECKING:
    from kha_train.data.sources import ProgressLog, SourceSpec

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")  # the first one is the EOS by default
# Names other tokenizers give their end-of-document token, tried in order when a tokenizer file
# comes without a tokenizer_config.json that says which one it is.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TRAINING_KEY = "kha_train"  # the tokenizer_config.json entry that records how it was trained
# A folder without tokenizer.json that transformers may still convert (sentencepiece, GPT-2).
SLOW_TOKENIZER_FILES = (CONFIG_FILE, "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
# The BPE trainer allocates ~70 bytes per requested token up front (1e9 asks for 70 GB and
# aborts the process); 16M is 64x the largest vocabularies in use.
MAX_VOCAB_SIZE = 1 << 24


@dataclass(frozen=True)
class LoadedTokenizer:
    """A ``tokenizers.Tokenizer`` with the special-token ids kha-train needs."""

    tokenizer: Tokenizer
    path: str  # where it was loaded from
    eos_token: str
    eos_id: int
    pad_id: int | None
    bos_id: int | None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included: ids are in [0, vocab_size)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def hash(self) -> str:
        return tokenizer_hash(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def tokenizer_hash(tok: Tokenizer | LoadedTokenizer) -> str:
    """A short fingerprint of everything that decides token ids (the serialized tokenizer)."""
    if isinstance(tok, LoadedTokenizer):
        tok = tok.tokenizer
    # to_str() serializes vocab and merges in id order, so equal tokenizers give equal strings.
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = False,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenization, digits split one by one).

    ``vocab_size`` counts the 256 byte symbols and the special tokens; a small corpus may stop
    short of it (the result's ``get_vocab_size()`` is then smaller). Special tokens get the first
    ids, in the order given.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens)
    floor = check_vocab_options(vocab_size, special_tokens, min_frequency)
    tok = Tokenizer(models.BPE())
    # Digits one by one (as Llama/Qwen do) keep numbers from eating vocabulary entries.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    if tok.get_vocab_size(with_added_tokens=True) <= floor - 1:
        raise DataError(
            "the tokenizer learned no merges: the training text is empty or too small (no pair "
            f"of symbols occurs --min-frequency {min_frequency} times); point --source at more "
            "text, or check --text-field"
        )
    return tok


def check_vocab_options(vocab_size: int, special_tokens: Sequence[str], min_frequency: int) -> int:
    """Check the training options that need no text; returns the smallest useful vocab size
    (256 byte symbols + the special tokens + one merge)."""
    if len(set(special_tokens)) != len(special_tokens):
        raise DataError(f"special tokens {list(special_tokens)} list a token twice")
    floor = 256 + len(special_tokens) + 1
    if vocab_size < floor:
        raise DataError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs 256 byte symbols + "
            f"{len(special_tokens)} special tokens + merges; use --vocab-size >= {floor}"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(
            f"vocab size {vocab_size:,} is too large: the trainer reserves memory for every "
            f"requested token up front; use --vocab-size <= {MAX_VOCAB_SIZE:,} (typical sizes "
            "are 8192 to 262144)"
        )
    if min_frequency < 0:
        raise DataError(f"--min-frequency must be >= 0, got {min_frequency}")
    return floor


def save_tokenizer(
    tok: Tokenizer,
    path: str | os.PathLike[str],
    *,
    eos_token: str,
    pad_token: str | None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``tokenizer.json`` atomically, plus a ``tokenizer_config.json`` beside it (when the
    file is named tokenizer.json) that records the EOS/pad tokens, so the folder also loads as a
    Hugging Face tokenizer directory. ``training`` (how the tokenizer was trained: requested and
    reached vocabulary, ...) goes into that config under ``"kha_train"``."""
    path = Path(path)
    for name, token in (("eos", eos_token), ("pad", pad_token)):
        if token is not None and tok.token_to_id(token) is None:
            raise DataError(f"the {name} token {token!r} is not in the tokenizer's vocabulary")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, tok.to_str(pretty=True))
    if path.name == TOKENIZER_FILE:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos_token,
            "pad_token": pad_token,
            "bos_token": None,
            "unk_token": None,
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if training is not None:
            config[TRAINING_KEY] = training
        _write_atomic(path.parent / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return path


def load_tokenizer(path: str | os.PathLike[str], eos_token: str | None = None) -> LoadedTokenizer:
    """Load a ``tokenizer.json`` file or a local Hugging Face tokenizer directory.

    The EOS token is, in order: ``eos_token`` if given, the ``eos_token`` of a
    ``tokenizer_config.json`` beside the file / in the directory, else the first of
    :data:`EOS_CANDIDATES` the vocabulary has.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"tokenizer not found: {p}. Train one with `kha-train tokenizer train --out {p}` or "
            "point to a tokenizer.json file / a local Hugging Face tokenizer directory"
        )
    folder = p if p.is_dir() else p.parent
    config = _read_tokenizer_config(folder / CONFIG_FILE)
    if p.is_dir():
        tok = _load_from_dir(p)
    else:
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise DataError(
                f"{p} is not a valid tokenizer.json ({str(e).splitlines()[0]}): re-create it with "
                "`kha-train tokenizer train` or point to another tokenizer"
            ) from e
    vocab = tok.get_vocab(with_added_tokens=True)

    def pick(explicit: str | None, key: str, candidates: Sequence[str]) -> str | None:
        for name in (explicit, _token_content(config.get(key)), *candidates):
            if name is not None and name in vocab:
                return name
        return None

    if eos_token is not None and eos_token not in vocab:
        raise DataError(f"--eos-token {eos_token!r} is not in the vocabulary of {p}")
    eos = pick(eos_token, "eos_token", EOS_CANDIDATES)
    if eos is None:
        specials = [t.content for t in tok.get_added_tokens_decoder().values()]
        raise DataError(
            f"cannot tell which token ends a document in {p}: pass --eos-token TOKEN "
            f"(its special tokens are: {specials or 'none'})"
        )
    pad = pick(None, "pad_token", PAD_CANDIDATES)
    bos_name = _token_content(config.get("bos_token"))
    return LoadedTokenizer(
        tokenizer=tok,
        path=str(p),
        eos_token=eos,
        eos_id=vocab[eos],
        pad_id=vocab[pad] if pad is not None else None,
        bos_id=vocab.get(bos_name) if bos_name else None,
    )


def training_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """How the tokenizer at ``path`` (file or folder) was trained, as ``tokenizer train`` wrote
    it into ``tokenizer_config.json`` (requested and reached vocab size, text it saw), or None."""
    p = Path(path)
    info = _read_tokenizer_config((p if p.is_dir() else p.parent) / CONFIG_FILE).get(TRAINING_KEY)
    return info if isinstance(info, dict) else None


def _load_from_dir(folder: Path) -> Tokenizer:
    file = folder / TOKENIZER_FILE
    if file.is_file():
        try:
            return Tokenizer.from_file(str(file))
        except Exception as e:
            raise DataError(
                f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0]}): re-create it "
                "with `kha-train tokenizer train` or point to another tokenizer"
            ) from e
    if not any((folder / name).is_file() for name in SLOW_TOKENIZER_FILES):
        raise DataError(
            f"{folder} holds no tokenizer ({TOKENIZER_FILE}, {CONFIG_FILE}, ...): point to the "
            f"tokenizer.json that `kha-train tokenizer train --out` wrote, or train one there "
            f"with `kha-train tokenizer train --out {folder / TOKENIZER_FILE}`"
        )
    # A directory with only slow-tokenizer files (e.g. a sentencepiece tokenizer.model):
    # transformers can convert it to a fast tokenizer, whose backend is a tokenizers.Tokenizer.
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as e:
        raise DataError(
            f"{folder} has no {TOKENIZER_FILE} and transformers could not load it "
            f"({str(e).splitlines()[0]}): point to a tokenizer.json or a Hugging Face "
            "tokenizer directory"
        ) from e
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{folder} holds a slow tokenizer only; save it with a tokenizer.json")
    return backend


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): fix or delete it") from e
    return data if isinstance(data, dict) else {}


def _token_content(value: object) -> str | None:
    """tokenizer_config.json stores a token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def train_tokenizer_from_source(
    source: SourceSpec,
    out: str | os.PathLike[str],
    *,
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    eos_token: str | None = None,
    pad_token: str | None = None,
    min_frequency: int = 2,
    max_docs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """``kha-train tokenizer train``: train on the documents of ``source`` and save to ``out``
    (a folder, existing or ending in ``/``, gets ``tokenizer.json`` inside). An existing ``out``
    is kept (and returned) unless ``overwrite``. EOS defaults to the first special token, pad to
    the second. When the text supports fewer merges than ``vocab_size`` asks for, a warning says
    so (also with ``progress`` off) and the config records requested and reached sizes."""
    import shutil
    import sys
    import tempfile

    from kha_train.data.errors import ensure_writable_dir, write_error
    from kha_train.data.sources import ProgressLog, iter_texts, open_source, progress_bars

    as_given = os.fspath(out)
    out = Path(out)
    if out.is_dir() or as_given.endswith(("/", os.sep)):  # Path() drops a trailing slash
        out = out / TOKENIZER_FILE
    if out.exists() and not overwrite:
        print(f"{out} exists; keeping it (pass --overwrite to retrain)", file=sys.stderr)
        return out
    special_tokens = list(special_tokens)
    if not special_tokens:
        raise DataError("--special-tokens needs at least the end-of-document token")
    eos_token = eos_token or special_tokens[0]
    if pad_token is None and len(special_tokens) > 1:
        pad_token = special_tokens[1]
    for name, token in (("--eos-token", eos_token), ("--pad-token", pad_token)):
        if token is not None and token not in special_tokens:
            raise DataError(f"{name} {token!r} must be one of --special-tokens {special_tokens}")
    if max_docs is not None and max_docs < 1:
        raise DataError(f"--max-docs must be >= 1, got {max_docs}")
    check_vocab_options(vocab_size, special_tokens, min_frequency)  # before reading the source
    bars = progress_bars(progress)
    # The Arrow cache of the source and the materialised builtin corpus live in a scratch
    # folder next to the output, removed afterwards.
    ensure_writable_dir(out.parent, "--out")
    work = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out.parent))
    try:
        opened = open_source(source, work)
        seen = _Counted(
            iter_texts(opened, max_docs), ProgressLog("tokenizer train", progress and not bars)
        )
        try:
            tok = train_tokenizer(
                seen,
                vocab_size,
                special_tokens=special_tokens,
                min_frequency=min_frequency,
                show_progress=bars,  # the tokenizers library's bars: blank lines in a log
                length=opened.num_rows if max_docs is None else max_docs,
            )
        except DataError:
            if seen.docs == 0:
                raise DataError(
                    f"--source {source.spec} holds no text: no non-empty document in column "
                    f"{opened.text_field!r}. Check --source and --text-field"
                ) from None
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reached = tok.get_vocab_size(with_added_tokens=True)
    training = {
        "vocab_size_requested": vocab_size,
        "vocab_size": reached,
        "min_frequency": min_frequency,
        "documents": seen.docs,
        "chars": seen.chars,
        "source": source.spec,
    }
    try:
        save_tokenizer(tok, out, eos_token=eos_token, pad_token=pad_token, training=training)
    except OSError as e:
        raise write_error(e, "--out", out) from e
    if reached < vocab_size:
        print(f"warning: {vocab_shortfall(training)}", file=sys.stderr)
    print(f"wrote {out}: vocab {reached}, eos {eos_token!r}", file=sys.stderr)  # the result
    return out


def vocab_shortfall(training: dict[str, Any]) -> str:
    """Why a trained vocabulary stopped short of the requested size, and what to do."""
    reached, requested = training["vocab_size"], training["vocab_size_requested"]
    docs = _plural(training["documents"], "document")
    return (
        f"the vocabulary reached {reached:,} of the {requested:,} tokens requested: the training "
        f"text ({docs}, {training['chars']:,} chars) has no more pairs of symbols that occur "
        f"--min-frequency {training['min_frequency']} times or more. "
        f"Train on more text (or lower --min-frequency), or pass --vocab-size {reached} to make "
        "this size the intended one"
    )


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


class _Counted:
    """Iterates texts, counting documents and characters (and printing a plain progress line
    now and then, for logs)."""

    def __init__(self, texts: Iterable[str], log: ProgressLog) -> None:
        self.texts, self.log = texts, log
        self.docs = self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.docs += 1
            self.chars += len(text)
            if self.log.due():
                self.log.log(f"read {self.docs:,} documents ({self.chars:,} chars)")
            yield text
        if self.log.lines:  # the reading was long enough to report: say what comes next
            self.log.log(
                f"read all {self.docs:,} documents ({self.chars:,} chars); computing merges"
            )
