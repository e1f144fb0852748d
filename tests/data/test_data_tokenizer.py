"""Tokenizer: training, save/load round trip, hashes, EOS/pad resolution, the CLI command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from data_helpers import write_jsonl

from kha_train.cli import main
from kha_train.data.errors import DataError
from kha_train.data.tokenizer import (
    LoadedTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

TEXTS = [
    "Plain ASCII text, with punctuation; and numbers: 12345 and 3.14159.",
    "Unicode survives byte-level BPE: naïve café, Ελληνικά, 日本語, emoji 🚀.",
    "  leading spaces, trailing spaces  \n\ttabs and\nnewlines\n",
    "",
]


def test_round_trip_is_exact(tok: LoadedTokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert [tok.decode(ids) for ids in tok.encode_batch(TEXTS)] == TEXTS


def test_special_tokens_and_config(tok: LoadedTokenizer, tokenizer_path: Path) -> None:
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, None)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.vocab_size <= 600
    # Special tokens in text are not produced by encode of ordinary text...
    assert tok.eos_id not in tok.encode("end of text")
    config = json.loads((tokenizer_path.parent / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"


def test_hash_stable_across_save_and_load(tok: LoadedTokenizer, tmp_path: Path) -> None:
    copy = save_tokenizer(
        tok.tokenizer, tmp_path / "tokenizer.json", eos_token="<|endoftext|>", pad_token=None
    )
    again = load_tokenizer(copy)
    assert again.hash == tok.hash == tokenizer_hash(tok.tokenizer)
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    other = train_tokenizer(TEXTS * 50, 300)
    assert tokenizer_hash(other) != tok.hash


def test_load_from_hf_directory_and_transformers(
    tok: LoadedTokenizer, tokenizer_path: Path
) -> None:
    from_dir = load_tokenizer(tokenizer_path.parent)
    assert from_dir.hash == tok.hash and from_dir.eos_id == tok.eos_id
    # The folder is also a valid Hugging Face tokenizer directory.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_path.parent), local_files_only=True)
    assert hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    assert hf(TEXTS[0])["input_ids"] == tok.encode(TEXTS[0])


def test_eos_resolution(tok: LoadedTokenizer, tmp_path: Path) -> None:
    bare = tmp_path / "bare.json"  # no tokenizer_config.json beside it: known names are tried
    bare.write_text(tok.tokenizer.to_str())
    assert load_tokenizer(bare).eos_id == 0
    assert load_tokenizer(bare, eos_token="<|pad|>").eos_id == 1
    with pytest.raises(DataError, match="not in the vocabulary"):
        load_tokenizer(bare, eos_token="<nope>")
    odd = train_tokenizer(TEXTS * 50, 300, special_tokens=["<sep>"])
    odd_path = tmp_path / "odd.json"
    odd_path.write_text(odd.to_str())
    with pytest.raises(DataError, match=r"cannot tell which token ends a document.*--eos-token"):
        load_tokenizer(odd_path)


def test_bad_tokenizer_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(broken)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(TEXTS, 100)


def test_cli_tokenizer_train(tmp_path: Path, docs: list[str], capsys) -> None:
    src = write_jsonl(tmp_path / "src" / "docs.jsonl", docs, field="content")
    out = tmp_path / "tok" / "tokenizer.json"
    args = ["tokenizer", "train", "--source", str(src), "--text-field", "content",
            "--vocab-size", "400", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    tok = load_tokenizer(out)
    assert 300 < tok.vocab_size <= 400 and tok.eos_id == 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tokenizer-")]  # cleaned
    before = out.stat().st_mtime_ns
    assert main(args) == 0  # an existing tokenizer is kept
    assert out.stat().st_mtime_ns == before
    assert main([*args, "--overwrite", "--vocab-size", "350"]) == 0
    assert load_tokenizer(out).vocab_size <= 350
    capsys.readouterr()
    assert main([*args[:-1], "--overwrite", "--text-field", "missing"]) == 2
    assert "no column 'missing'" in capsys.readouterr().err


def test_builtin_corpus(tmp_path: Path) -> None:
    from kha_train.data.corpus import CORPUS_FILE, write_builtin_corpus

    path = write_builtin_corpus(tmp_path)
    assert path.name == CORPUS_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) > 200 and sum(len(r["text"]) for r in rows) > 1_000_000
    assert all(r["text"].strip() for r in rows)
    assert any(r["source"].startswith("pydoc_data.topics:") for r in rows)
    assert any(r["source"].startswith("stdlib:") for r in rows)
    mtime = path.stat().st_mtime_ns
    assert write_builtin_corpus(tmp_path) == path and path.stat().st_mtime_ns == mtime  # reused
    shutil.rmtree(tmp_path)


def test_vocab_shortfall_is_reported_and_recorded(tmp_path: Path, docs: list[str], capfd) -> None:
    """A small text cannot fill a large vocabulary: the command says what it reached and why, in
    one warning line (also with --no-progress, as is the result line), and
    tokenizer_config.json records both sizes."""
    (tmp_path / "small.txt").write_text(docs[3])
    out = tmp_path / "tok" / "tokenizer.json"
    args = ["tokenizer", "train", "--source", str(tmp_path / "small.txt"), "--out", str(out),
            "--vocab-size", "8192", "--no-progress"]  # fmt: skip
    capfd.readouterr()
    assert main(args) == 0
    reached = load_tokenizer(out).vocab_size
    assert 259 < reached < 8192
    lines = capfd.readouterr().err.splitlines()
    assert lines == [
        f"warning: the vocabulary reached {reached:,} of the 8,192 tokens requested: the "
        f"training text (1 document, {len(docs[3]):,} chars) has no more pairs of symbols that "
        "occur --min-frequency 2 times or more. Train on more text (or lower --min-frequency), "
        f"or pass --vocab-size {reached} to make this size the intended one",
        f"wrote {out}: vocab {reached}, eos '<|endoftext|>'",  # the result, also --no-progress
    ]
    config = json.loads((out.parent / "tokenizer_config.json").read_text())
    assert config["kha_train"] == {
        "vocab_size_requested": 8192, "vocab_size": reached, "min_frequency": 2,
        "documents": 1, "chars": len(docs[3]), "source": str(tmp_path / "small.txt"),
    }  # fmt: skip
    from transformers import AutoTokenizer  # the extra config entry does not disturb HF

    hf = AutoTokenizer.from_pretrained(str(out.parent), local_files_only=True)
    assert hf.eos_token_id == 0 and len(hf) == reached
    # A vocabulary that is reached: no warning, and the record says so.
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    assert main([*args[:3], str(src), *args[4:6], "--vocab-size", "300", "--overwrite"]) == 0
    assert "warning" not in capfd.readouterr().err
    info = json.loads((out.parent / "tokenizer_config.json").read_text())["kha_train"]
    assert info["vocab_size_requested"] == info["vocab_size"] == 300
    assert info["documents"] == len(docs)


def test_out_may_name_a_folder(tmp_path: Path, docs: list[str]) -> None:
    src = write_jsonl(tmp_path / "docs.jsonl", docs[:50])
    for out in (f"{tmp_path}/new/", str(tmp_path)):  # a trailing slash, or an existing folder
        args = ["tokenizer", "train", "--source", str(src), "--out", out, "--vocab-size", "300",
                "--no-progress"]  # fmt: skip
        assert main(args) == 0
        assert load_tokenizer(Path(out) / "tokenizer.json").vocab_size == 300
