"""The embedded default corpus: real English text that every CPython install already has.

Two parts, both human-written documentation, read from the running interpreter (no download,
nothing stored in the repository):

1. ``pydoc_data.topics``: the language reference topics ``help()`` shows (~0.5 MB).
2. The docstrings of the standard library's own modules (~1 MB): per module, its module,
   class and function docstrings of at least :data:`MIN_DOCSTRING_CHARS`, one document each.
   They are read with ``ast`` (nothing is imported). Test suites, IDLE and the tkinter demos
   are left out.

About 1.5 MB of text, ~0.4 M tokens with an 8k vocabulary: enough for a tiny model's loss to
fall visibly within a few CPU minutes. ``write_builtin_corpus(dir)`` materialises it as a JSONL
file that ``kha-train data prepare`` reads like any local source (``--source builtin`` does it
for you). The text depends on the Python version, so the corpus key names it.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

CORPUS_VERSION = 1  # bump when the selection below changes
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly one-line summaries
MIN_DOCUMENT_CHARS = 400
CORPUS_FILE = "builtin_corpus.jsonl"
# Standard-library folders whose docstrings are not documentation prose (tests, demos, GUIs).
SKIPPED_PARTS = frozenset(
    {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
     "dist-packages", "pydoc_data", "__pycache__"}
)  # fmt: skip


def corpus_key() -> str:
    """Identifies the corpus content: its selection version and the Python that supplies it."""
    v = sys.version_info
    return f"builtin-v{CORPUS_VERSION}-py{v.major}.{v.minor}.{v.micro}"


def builtin_documents() -> Iterator[dict[str, str]]:
    """Yield ``{"text": ..., "source": ...}`` documents in a fixed order."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield {"text": text, "source": f"pydoc_data.topics:{name}"}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_PARTS.intersection(rel.parts):
            continue
        text = _module_docstrings(path)
        if len(text) >= MIN_DOCUMENT_CHARS:
            yield {"text": text, "source": f"stdlib:{rel.as_posix()}"}


def _module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ""
    parts = []
    for node in ast.walk(tree):  # breadth-first: the module docstring comes first
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def write_builtin_corpus(directory: str | os.PathLike[str]) -> Path:
    """Materialise the corpus as ``<directory>/builtin_corpus.jsonl`` (one ``{"text", "source"}``
    object per line) and return its path. Reuses an existing file written for the same
    :func:`corpus_key`; writes through a temporary name so a crash never leaves half a file."""
    directory = Path(directory)
    path = directory / CORPUS_FILE
    key_file = directory / (CORPUS_FILE + ".key")
    if path.is_file() and key_file.is_file() and key_file.read_text().strip() == corpus_key():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in builtin_documents():
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    tmp.replace(path)
    key_file.write_text(corpus_key() + "\n")
    return path
