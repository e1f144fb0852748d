"""Bad input: every case is a DataError that names the file and the fix, raised before training."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import write_jsonl

import kha_train.data.shards as shards
from kha_train.cli import main
from kha_train.data.loader import PackedLoader
from kha_train.data.errors import DataError
from kha_train.data.shards import read_index


@pytest.fixture
def ds(tmp_path: Path, dataset: Path) -> Path:
    """A private copy of the shared prepared dataset, free to damage."""
    return Path(shutil.copytree(dataset, tmp_path / "ds"))


def loader(path: Path, **kw) -> PackedLoader:
    kw = {"seq_len": 16, "micro_batch_size": 2, "global_batch_size": 4, "prefetch": 0, **kw}
    return PackedLoader(path, **kw)


def test_tokenizer_hash_mismatch(ds: Path) -> None:
    with pytest.raises(
        DataError, match=r"index\.json was tokenized with tokenizer .* data\.tokenizer"
    ):
        loader(ds, expected_tokenizer_hash="0123456789abcdef")
    loader(ds, expected_tokenizer_hash=read_index(ds).tokenizer_hash)  # the right one passes


def test_vocab_size_larger_than_the_model(ds: Path) -> None:
    vocab = read_index(ds).vocab_size
    with pytest.raises(
        DataError, match=rf"model\.vocab_size is 100: set model\.vocab_size >= {vocab}"
    ):
        loader(ds, expected_vocab_size=100)
    loader(ds, expected_vocab_size=vocab + 64)  # padding rows are fine


def poke(path: Path, position: int, value: int) -> None:
    data = np.fromfile(path, dtype=np.uint16)
    data[position] = value
    data.tofile(path)


def test_token_ids_out_of_range(ds: Path, monkeypatch) -> None:
    poke(ds / "train_00001.bin", 5, 60_000)
    with pytest.raises(
        DataError, match=r"shard .*train_00001\.bin holds token id 60000, outside the vocab"
    ):
        loader(ds)
    # Past the ids checked at open time, the read that meets the bad id raises (also through
    # the prefetch thread).
    poke(ds / "train_00001.bin", 5, 3)
    poke(ds / "train_00002.bin", 50, 61_000)
    monkeypatch.setattr(shards, "ID_CHECK_TOKENS", 8)
    ld = loader(ds, prefetch=2)
    with pytest.raises(DataError, match=r"train_00002\.bin holds token id 61000"):
        for _ in range(ld.num_samples):
            next(ld)


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"dataset directory .*nowhere does not exist: run `kha-train data prepare"
    ):
        loader(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match=r"half has no index\.json.*did not finish.*resumes"):
        loader(tmp_path / "half")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: "{ not json", "not valid JSON"),
        (lambda raw: json.dumps({k: v for k, v in raw.items() if k != "tokenizer"}), "missing key 'tokenizer'"),
        (lambda raw: json.dumps({**raw, "dtype": "float32"}), "dtype float32 cannot hold"),
        (lambda raw: json.dumps({**raw, "format": "other"}), "'format' is 'other'"),
        (lambda raw: json.dumps({**raw, "splits": {"train": {"shards": [{"file": "x"}]}}}), "missing key 'tokens'"),
    ],
)  # fmt: skip
def test_corrupt_index(ds: Path, damage, message: str, prepare) -> None:
    raw = json.loads((ds / "index.json").read_text())
    (ds / "index.json").write_text(damage(raw))
    with pytest.raises(
        DataError, match=rf"index\.json is corrupt \(.*{message}.*re-run `kha-train data prepare"
    ):
        loader(ds)
    s = raw["settings"]  # the fix the message names: re-running prepare rebuilds the index
    prepare(
        raw["source"]["spec"], ds, val_fraction=s["val_fraction"], shard_tokens=s["shard_tokens"]
    )
    assert json.loads((ds / "index.json").read_text()) == raw


def test_truncated_and_missing_shards_and_repair(ds: Path, dataset: Path, prepare) -> None:
    shard = ds / "train_00002.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-2])
    with pytest.raises(
        DataError, match=r"shard .*train_00002\.bin is truncated: .* re-run `kha-train data prepare"
    ):
        loader(ds)
    # Re-running prepare with the original settings rewrites the damaged shard (and only it
    # and what follows); the result equals the original.
    raw = json.loads((ds / "index.json").read_text())
    first = (ds / "train_00000.bin").stat().st_mtime_ns
    src, s = raw["source"]["spec"], raw["settings"]
    prepare(src, ds, val_fraction=s["val_fraction"], shard_tokens=s["shard_tokens"])
    assert shard.read_bytes() == good and (ds / "train_00000.bin").stat().st_mtime_ns == first
    loader(ds)
    shard.unlink()
    with pytest.raises(DataError, match=r"train_00002\.bin listed in .*index\.json is missing"):
        loader(ds)


def test_val_split_missing_or_too_small(tmp_path: Path, docs, prepare) -> None:
    out = tmp_path / "noval"
    prepare(write_jsonl(tmp_path / "a.jsonl", docs[:50]), out, val_fraction=0.0)
    with pytest.raises(DataError, match=r"has no val tokens \(prepare with --val-fraction > 0\)"):
        loader(out, split="val")


def test_source_errors(tmp_path: Path, prepare) -> None:
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"--source path .*missing\.jsonl does not exist"):
        prepare(tmp_path / "missing.jsonl", out)
    with pytest.raises(DataError, match=r"hub:org/name"):
        prepare("org/name", out)
    with pytest.raises(DataError, match="matches no file"):
        prepare(tmp_path / "*.parquet", out)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty \(0 bytes\)"):
        prepare(tmp_path / "empty.jsonl", out)
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match=r"directory .*dir holds no .*jsonl"):
        prepare(tmp_path / "dir", out)
    # A mixed source: every non-.txt file needs the text column (.txt files always have it).
    write_jsonl(tmp_path / "mix" / "a.jsonl", ["x y z"], field="body")
    (tmp_path / "mix" / "b.txt").write_text("words")
    with pytest.raises(
        DataError, match=r"mix/a\.jsonl has no column 'text' \(its columns: \['body'"
    ):
        prepare(tmp_path / "mix", out)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"could not read .*bad\.jsonl as json: JSON parse error"):
        prepare(tmp_path / "bad.jsonl", out)
    src = write_jsonl(tmp_path / "a.jsonl", ["some text"] * 3, field="body")
    with pytest.raises(DataError, match=r"has no column 'text' .*--text-field"):
        prepare(src, out)
    with pytest.raises(
        DataError, match=r"a\.jsonl: row 0, column 'other' holds a int \('1'\), not text"
    ):
        prepare(src, out, source_kw={"text_field": "other"})
    blank = write_jsonl(tmp_path / "blank.jsonl", ["", "  ", "\n"])
    with pytest.raises(DataError, match=r"yielded no training text .*--text-field"):
        prepare(blank, tmp_path / "out2")
    with pytest.raises(DataError, match="tokenizer not found"):
        prepare(src, out, tokenizer=str(tmp_path / "nope.json"))


def test_cli_reports_bad_input_as_one_line(tmp_path: Path, tokenizer_path: Path, capsys) -> None:
    code = main(["data", "prepare", "--source", str(tmp_path / "gone.jsonl"), "--tokenizer",
                 str(tokenizer_path), "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --source path") and "gone.jsonl" in err
    assert "Traceback" not in err


def _bad_inputs(tmp: Path) -> None:
    """The files a user gets wrong: each case below points a command at one of them."""
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.txt").write_text("  \n\n")
    write_jsonl(tmp / "body.jsonl", ["some text here"] * 5, field="body")
    (tmp / "table.csv").write_text("text\nhello\n")
    (tmp / "broken.jsonl").write_text("{not json\n")
    (tmp / "a_file").write_text("not a folder")
    (tmp / "no_tokenizer").mkdir()
    write_jsonl(tmp / "ok.jsonl", ["a fine document with some words in it"] * 20)


# (command, arguments, the one error line it must print): {tmp} is the test folder.
BAD_CLI_INPUTS = [
    ("tokenizer", "--source {tmp}/gone.txt", r"--source path .*gone\.txt does not exist"),
    ("tokenizer", "--source {tmp}/empty.jsonl", r"empty\.jsonl is empty \(0 bytes\): remove it"),
    ("tokenizer", "--source {tmp}/blank.txt", r"holds no text: no non-empty document .*--text-field"),
    ("tokenizer", "--source {tmp}/body.jsonl", r"has no column 'text' \(its columns: \['body', 'other'\]\): pass --text-field"),
    ("tokenizer", "--source {tmp}/table.csv", r"table\.csv: unsupported file type; use \.jsonl"),
    ("tokenizer", "--source {tmp}/broken.jsonl", r"could not read .*broken\.jsonl as json: JSON parse error"),
    ("tokenizer", "--source {tmp}/ok.jsonl --vocab-size 0", r"vocab size 0 is too small.*--vocab-size >= 259"),
    ("tokenizer", "--source {tmp}/ok.jsonl --vocab-size 20000000", r"too large: the trainer reserves memory .*--vocab-size <= 16,777,216"),
    ("tokenizer", "--source {tmp}/ok.jsonl --min-frequency -1", r"--min-frequency must be >= 0"),
    ("tokenizer", "--source {tmp}/ok.jsonl --max-docs 0", r"--max-docs must be >= 1"),
    ("tokenizer", "--source {tmp}/ok.jsonl --out {tmp}/a_file/tokenizer.json", r"cannot write --out .*a_file: it is a file, not a folder; choose another --out"),
    ("data", "--source {tmp}/gone.jsonl", r"--source path .*gone\.jsonl does not exist"),
    ("data", "--source {tmp}/empty.jsonl", r"empty\.jsonl is empty \(0 bytes\)"),
    ("data", "--source {tmp}/body.jsonl", r"has no column 'text' .*--text-field"),
    ("data", "--source {tmp}/table.csv", r"unsupported file type"),
    ("data", "--source {tmp}/broken.jsonl", r"could not read .*broken\.jsonl as json: JSON parse error"),
    ("data", "--source {tmp}/blank.txt", r"yielded no training text .*--text-field"),
    ("data", "--source {tmp}/ok.jsonl --out {tmp}/a_file", r"cannot write --out .*a_file: it is a file, not a folder"),
    ("data", "--source {tmp}/ok.jsonl --out {tmp}/a_file/ds", r"cannot write --out .*a_file/ds: a part of the path is a file"),
    ("data", "--source {tmp}/ok.jsonl --tokenizer {tmp}/no_tokenizer", r"no_tokenizer holds no tokenizer .*kha-train tokenizer train --out"),
    ("data", "--source {tmp}/ok.jsonl --tokenizer {tmp}/ok.jsonl", r"ok\.jsonl is not a valid tokenizer\.json"),
]  # fmt: skip


@pytest.mark.parametrize(("command", "args", "message"), BAD_CLI_INPUTS)
def test_cli_bad_input_is_one_error_line_with_the_fix(
    tmp_path: Path, tokenizer_path: Path, capfd, command: str, args: str, message: str
) -> None:
    """What a new user types wrong, through the real CLI: exit code 2 and one `error:` line (no
    traceback, no progress output), which names the problem and the fix."""
    _bad_inputs(tmp_path)
    defaults = {  # argparse keeps the last of a repeated option: the case's own come after
        "tokenizer": ["train", "--vocab-size", "300", "--out", f"{tmp_path}/out/tokenizer.json"],
        "data": ["prepare", "--tokenizer", str(tokenizer_path), "--out", f"{tmp_path}/out/ds"],
    }
    capfd.readouterr()
    assert main([command, *defaults[command], *args.format(tmp=tmp_path).split()]) == 2
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert out == ""


def test_write_errors_name_the_option_and_the_fix(
    tmp_path: Path, docs, prepare, monkeypatch
) -> None:
    from kha_train.data.errors import ensure_writable_dir, write_error

    denied = PermissionError(errno.EACCES, "Permission denied", "/data/out")
    assert str(write_error(denied, "--out")) == (
        "cannot write --out /data/out: permission denied; choose an --out folder you can write "
        "to, or give your user write access"
    )
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/train_00000.bin")
    assert "no space left; free space on that disk" in str(write_error(full, "--out"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DataError, match=r"cannot write --out .*locked.*permission denied"):
            ensure_writable_dir(locked / "ds", "--out")
    # A disk that fills up half-way through prepare: one DataError naming the shard file.
    import kha_train.data.prepare as prep

    def no_space(path, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(prep, "write_shard", no_space)
    with pytest.raises(DataError, match=r"cannot write --out .*train_00000\.bin: no space left"):
        prepare(write_jsonl(tmp_path / "a.jsonl", docs[:20]), tmp_path / "out")


def test_from_config_checks_model_vocab_and_tokenizer(
    ds: Path, tokenizer_path: Path, tmp_path: Path
) -> None:
    from kha_train.config import Config, DataConfig, ModelConfig, TrainConfig
    from kha_train.data.tokenizer import save_tokenizer, train_tokenizer

    vocab = read_index(ds).vocab_size

    def cfg(tokenizer: Path | None, vocab_size: int = vocab) -> Config:
        return Config(
            model=ModelConfig(vocab_size=vocab_size),
            data=DataConfig(dataset=str(ds), seq_len=16, tokenizer=str(tokenizer) if tokenizer else None),
            train=TrainConfig(global_batch_tokens=16 * 8, micro_batch_size=2, max_steps=1),
        )  # fmt: skip

    ld = PackedLoader.from_config(cfg(tokenizer_path), rank=1, world_size=2)
    assert (ld.global_batch_size, ld.micro_batches_per_step, ld.rank) == (8, 2, 1)
    assert PackedLoader.from_config(cfg(None), "val").split == "val"
    with pytest.raises(DataError, match=r"model\.vocab_size is 300"):
        PackedLoader.from_config(cfg(None, vocab_size=300))
    other = train_tokenizer(["another tokenizer, another vocabulary"] * 30, 300)
    other_path = save_tokenizer(other, tmp_path / "other" / "tokenizer.json", eos_token="<|endoftext|>",
                                pad_token=None)  # fmt: skip
    with pytest.raises(DataError, match=r"was tokenized with tokenizer .*point data\.tokenizer"):
        PackedLoader.from_config(cfg(other_path))
