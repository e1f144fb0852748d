"""Bad input: every case is a DataError that names the file and the fix, raised before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import write_jsonl

import kha_train.data.shards as shards
from kha_train.cli import main
from kha_train.data import PackedLoader
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
    write_jsonl(tmp_path / "mix" / "a.jsonl", ["x y z"])
    (tmp_path / "mix" / "b.txt").write_text("words")
    with pytest.raises(DataError, match="mixes file formats"):
        prepare(tmp_path / "mix", out)
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
