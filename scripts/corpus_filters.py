"""What the study corpus keeps (scripts/build_corpus.py): text normalised and cut at paragraphs,
documents not worth training on (binary, symbol or digit tables, minified or generated code,
stubs), documents that look like speeches (reserved for evaluation), and exact and near
duplicates."""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

MIN_CHARS = 200  # shorter documents are mostly stubs, redirects and empty modules

# Speech collections are reserved for evaluation (build_corpus.py refuses them by name too).
SPEECH_LABEL = re.compile(r"speech|sotu|inaugur|state.of.the.union|oration", re.I)
SPEECH_TEXT = re.compile(
    r"fellow[- ]citizens|state of the union|inaugural address|my fellow americans|"
    r"mr\. speaker|mr\. president and members",
    re.I,
)
GENERATED = re.compile(
    r"do not edit|auto-?generated|automatically generated|generated (?:by|from|with)"
    r"|this file (?:is|was) generated",
    re.I,
)


def normalise(text: str) -> str:
    """Unix newlines, no trailing spaces, no leading/trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def split_at_paragraphs(text: str, cap: int) -> list[str]:
    """Chunks of at most ``cap`` characters, cut at blank lines (else at line ends)."""
    if len(text) <= cap:
        return [text]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for part in re.split(r"(?<=\n\n)", text):
        pieces = [part] if len(part) <= cap else re.split(r"(?<=\n)", part)
        for piece in pieces:
            if size + len(piece) > cap and current:
                chunks.append("".join(current).strip("\n"))
                current, size = [], 0
            current.append(piece[:cap])
            size += len(piece[:cap])
    if current:
        chunks.append("".join(current).strip("\n"))
    return [c for c in chunks if c]


LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
DIGITS = b"0123456789"
HIGH_BYTES = bytes(range(128, 256))
CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\ufffd]")


def junk_reason(text: str, kind: str) -> str | None:
    """Why a document is not worth training on, or None."""
    if len(text) < MIN_CHARS:
        return "short"
    if len(CONTROL.findall(text)) > len(text) / 1000:
        return "binary"
    raw = text.encode()
    dense = len(raw) - raw.count(b" ") - raw.count(b"\n") - raw.count(b"\t")
    # non-ASCII letters (accents, other scripts) count as letters in prose
    non_ascii = len(raw) - len(raw.translate(None, HIGH_BYTES)) if kind == "prose" else 0
    letters = len(raw) - len(raw.translate(None, LETTERS)) + non_ascii
    if letters < 0.25 * dense:
        return "symbols"
    if len(raw) - len(raw.translate(None, DIGITS)) > 0.3 * dense:
        return "numeric"
    longest = max(len(line) for line in text.split("\n"))
    if kind == "code":
        if longest > 1000 or len(text) / (text.count("\n") + 1) > 150:
            return "long-lines"
        if GENERATED.search(text[:2000]):
            return "generated"
    elif longest > 30_000:
        return "long-lines"
    return None


def speech_reason(label: str, text: str) -> str | None:
    """Documents that look like speeches are reserved for evaluation."""
    if SPEECH_LABEL.search(label):
        return "speech-name"
    hits = SPEECH_TEXT.findall(text)
    if len(hits) >= 2 or SPEECH_TEXT.search(text[:2000]):
        return "speech-text"
    return None


class Dedup:
    """Exact (normalised-text hash) and near (MinHash of the line set) duplicate detection.

    Near duplicates are the same file in two packages or versions, reformatted or lightly
    edited: documents whose sets of non-trivial lines overlap by >= ~75% (Jaccard). 32 hash
    functions in 8 bands of 4 find candidates; the share of equal signature values confirms.
    """

    NUM_HASHES, BANDS, THRESHOLD, MIN_LINES = 32, 8, 0.75, 8

    def __init__(self) -> None:
        rng = np.random.default_rng(20261201)  # fixed: the same documents win on every run
        self.mul = rng.integers(1, 2**63, self.NUM_HASHES, dtype=np.uint64) | np.uint64(1)
        self.add = rng.integers(0, 2**63, self.NUM_HASHES, dtype=np.uint64)
        self.exact: set[bytes] = set()
        self.bands: dict[bytes, int] = {}
        self.sigs: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray | None:
        lines = {" ".join(line.split()).lower() for line in text.split("\n")}
        hashes = [zlib.crc32(line.encode()) for line in lines if len(line) >= 8]
        if len(hashes) < self.MIN_LINES:
            return None
        x = np.asarray(hashes, dtype=np.uint64)[:, None]
        with np.errstate(over="ignore"):  # multiply-shift hashing wraps on purpose
            mixed = (x * self.mul + self.add) >> np.uint64(32)
        return mixed.min(axis=0).astype(np.uint32)

    def check(self, text: str) -> str | None:
        """'exact' or 'near' for a duplicate of an earlier document; else registers it."""
        key = hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()
        if key in self.exact:
            return "exact-dup"
        sig = self.signature(text)
        band_keys = []
        if sig is not None:
            rows = self.NUM_HASHES // self.BANDS
            band_keys = [
                bytes([b]) + sig[b * rows : (b + 1) * rows].tobytes() for b in range(self.BANDS)
            ]
            for bk in band_keys:
                other = self.bands.get(bk)
                if other is not None and (self.sigs[other] == sig).mean() >= self.THRESHOLD:
                    return "near-dup"
        self.exact.add(key)
        if sig is not None:
            self.sigs.append(sig)
            for bk in band_keys:
                self.bands.setdefault(bk, len(self.sigs) - 1)
        return None
