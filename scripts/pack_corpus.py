"""Pack a prepared dataset directory into xz-compressed parts small enough to travel, and
unpack them again with nothing but the Python standard library.

The GPU machine takes at most 64 MiB of files per call (the repository included) and has no
``datasets`` library, so ``kha-train data prepare`` cannot run there; the trainer only needs
the prepared directory (``index.json``, ``tokenizer.json``, the shard files). This script
turns that directory into one reproducible tar stream (sorted names, zeroed times and
owners), compresses it with xz (stdlib ``lzma``) and cuts the stream into parts of at most
``--part-mib`` MiB, plus ``parts.json`` (sizes and sha256 of every part and every file)::

    python3 scripts/pack_corpus.py pack data/study --out data/pack        # here
    python3 scripts/pack_corpus.py unpack data/pack --out data/study      # there

Ship one part per call to a warm machine (``carry: ["data/pack/parts.json",
"data/pack/study.tar.xz.000"]``, then ``.001``, ...: ignored files already there stay), and
unpack in the last call. ``unpack`` checks every part and every file against ``parts.json``,
extracts into ``OUT.tmp`` and renames it to OUT only when all is well.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

MIB = 1 << 20
PARTS_FILE = "parts.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


class PartWriter(io.RawIOBase):
    """A write-only stream that spills into NAME.000, NAME.001, ... of at most ``limit``
    bytes each, hashing each part as it goes."""

    def __init__(self, stem: Path, limit: int) -> None:
        self.stem, self.limit = stem, limit
        self.parts: list[dict] = []
        self._file: io.BufferedWriter | None = None
        self._size = 0
        self._hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def _next_part(self) -> None:
        self._close_part()
        path = self.stem.with_name(f"{self.stem.name}.{len(self.parts):03d}")
        self.parts.append({"file": path.name})
        self._file, self._size, self._hash = path.open("wb"), 0, hashlib.sha256()

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1].update(bytes=self._size, sha256=self._hash.hexdigest())
            self._file = None

    def write(self, data: bytes) -> int:  # type: ignore[override]
        view = memoryview(data)
        while view:
            if self._file is None or self._size == self.limit:
                self._next_part()
            take = view[: self.limit - self._size]
            self._file.write(take)  # type: ignore[union-attr]
            self._hash.update(take)
            self._size += len(take)
            view = view[len(take) :]
        return len(data)

    def close(self) -> None:
        self._close_part()
        super().close()


def tar_info(path: Path, name: str) -> tarfile.TarInfo:
    """Entries without times or owners, so the same directory packs to the same bytes."""
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    return info


def pack(src: Path, out: Path, part_mib: float, preset: int) -> None:
    if not (src / "index.json").exists():
        raise SystemExit(f"{src} has no index.json: not a finished `kha-train data prepare` dir")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{src.name}.tar.xz.*"):
        old.unlink()
    # hidden entries (.hf_cache of an unfinished prepare) and temporaries are not the dataset
    paths = sorted(
        p
        for p in src.rglob("*")
        if p.is_file()
        and not p.name.endswith(".tmp")
        and not any(part.startswith(".") for part in p.relative_to(src).parts)
    )
    start = time.time()
    writer = PartWriter(out / f"{src.name}.tar.xz", int(part_mib * MIB))
    files = []
    with lzma.open(writer, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
        for path in paths:
            name = path.relative_to(src).as_posix()
            with open(path, "rb") as f:
                tar.addfile(tar_info(path, name), f)
            files.append({"name": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
    writer.close()
    raw = sum(f["bytes"] for f in files)
    packed = sum(p["bytes"] for p in writer.parts)
    meta = {
        "format": "kha-train-packed-dir",
        "version": 1,
        "directory": src.name,
        "compression": f"xz (lzma preset {preset}) of a tar stream, cut into parts",
        "raw_bytes": raw,
        "compressed_bytes": packed,
        "parts": writer.parts,
        "files": files,
    }
    (out / PARTS_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    print(
        f"packed {len(files)} files, {raw / MIB:.1f} MiB -> {packed / MIB:.1f} MiB "
        f"({packed / raw:.1%}) in {len(writer.parts)} part(s) under {out} "
        f"({time.time() - start:.0f} s)"
    )
    for part in writer.parts:
        print(f"  {part['file']}: {part['bytes'] / MIB:.1f} MiB")


class PartReader(io.RawIOBase):
    """The parts read back as one stream, each checked against its sha256 first."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths: Iterator[Path] = iter(paths)
        self._file: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while True:
            if self._file is None:
                path = next(self._paths, None)
                if path is None:
                    return 0
                self._file = path.open("rb")
            n = self._file.readinto(buffer)
            if n:
                return n
            self._file.close()
            self._file = None


def check_parts(folder: Path, meta: dict) -> list[Path]:
    paths = [folder / p["file"] for p in meta["parts"]]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"missing part(s) in {folder}: {', '.join(missing)}")
    for path, part in zip(paths, meta["parts"], strict=True):
        if path.stat().st_size != part["bytes"] or sha256_file(path) != part["sha256"]:
            raise SystemExit(f"{path} is damaged (size or sha256 differs from {PARTS_FILE})")
    return paths


def unpack(folder: Path, out: Path) -> None:
    meta = json.loads((folder / PARTS_FILE).read_text())
    if (out / "index.json").exists():
        print(f"{out} already holds a prepared dataset: nothing to do")
        return
    start = time.time()
    paths = check_parts(folder, meta)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stream = io.BufferedReader(PartReader(paths), buffer_size=MIB)
    with lzma.open(stream, "rb") as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        # the "data" filter (no absolute paths, links out, devices) exists from Python 3.11.4
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, **safe)
    for f in meta["files"]:
        if sha256_file(tmp / f["name"]) != f["sha256"]:
            raise SystemExit(f"{f['name']} unpacked with the wrong sha256: parts are corrupt")
    if out.exists():
        out.rmdir()  # only an empty leftover; a finished one returned above
    tmp.rename(out)
    print(
        f"unpacked {len(meta['files'])} files, {meta['raw_bytes'] / MIB:.1f} MiB into {out} "
        f"({time.time() - start:.0f} s)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="prepared dir -> xz parts + parts.json")
    p.add_argument("src", type=Path, help="the prepared dataset directory (has index.json)")
    p.add_argument("--out", type=Path, required=True, help="folder for the parts")
    p.add_argument(
        "--part-mib",
        type=float,
        default=56.0,
        help="largest part in MiB (default 56: 64 MiB per call minus the repo)",
    )
    p.add_argument("--preset", type=int, default=9, help="xz preset 0-9 (default 9)")
    u = sub.add_parser("unpack", help="parts + parts.json -> prepared dir (stdlib only)")
    u.add_argument("folder", type=Path, help="the folder holding parts.json and the parts")
    u.add_argument("--out", type=Path, required=True, help="the prepared directory to create")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.src, args.out, args.part_mib, args.preset)
    else:
        unpack(args.folder, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
