"""data prepare: formats, shards, index, validation hold-out, resume, parallel and streaming."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import read_split, split_docs, write_jsonl

import kha_train.data.prepare as prep
from kha_train.cli import main
from kha_train.data.errors import DataError
from kha_train.data.shards import read_index, token_dtype
from kha_train.data.tokenizer import LoadedTokenizer


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def test_index_and_token_stream(
    tmp_path: Path, docs: list[str], tok: LoadedTokenizer, prepare
) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [*docs[:60], "", "   "])
    index = prepare(src, tmp_path / "out", val_fraction=0.0)
    raw = json.loads((tmp_path / "out" / "index.json").read_text())
    assert raw["tokenizer"]["hash"] == tok.hash and raw["vocab_size"] == tok.vocab_size
    assert raw["dtype"] == "uint16" and index.dtype == np.uint16
    assert raw["source"]["fingerprint"] and raw["skipped_empty_docs"] == 2
    assert raw["splits"]["train"]["docs"] == 60 and raw["splits"]["val"]["tokens"] == 0
    expected = np.concatenate([[*tok.encode(d), tok.eos_id] for d in docs[:60]])
    assert np.array_equal(
        read_split(index, "train"), expected
    )  # documents in order, EOS after each
    assert raw["splits"]["train"]["tokens"] == len(expected)
    assert (
        tmp_path / "out" / "tokenizer.json"
    ).is_file()  # a copy: the directory is self-contained
    assert (
        not (tmp_path / "out" / ".hf_cache").exists()
        and not (tmp_path / "out" / "prepare.json").exists()
    )


def test_shards_end_at_document_boundaries(dataset: Path, tok: LoadedTokenizer) -> None:
    index = read_index(dataset)
    train = index.splits["train"]
    assert len(train.shards) >= 4
    for shard in train.shards:
        data = np.fromfile(dataset / shard.file, dtype=index.dtype)
        assert len(data) == shard.tokens and data[-1] == tok.eos_id
        assert shard.docs == int((data == tok.eos_id).sum())
    assert all(s.tokens >= 4000 for s in train.shards[:-1])  # cut at the first doc end after 4000


def test_validation_split_shares_no_document(tmp_path: Path, docs: list[str], tok, prepare) -> None:
    repeated = docs + docs[:50]  # duplicated documents must land in the same split
    index = prepare(
        write_jsonl(tmp_path / "a.jsonl", repeated), tmp_path / "out", val_fraction=0.25
    )
    train = {tuple(d) for d in split_docs(read_split(index, "train"), tok.eos_id)}
    val = {tuple(d) for d in split_docs(read_split(index, "val"), tok.eos_id)}
    assert len(val) >= 20 and len(train) >= 100
    assert not train & val
    assert index.splits["train"].docs + index.splits["val"].docs == len(repeated)
    all_docs = {(*tok.encode(d), tok.eos_id) for d in repeated}
    assert train | val == all_docs


def test_val_max_tokens_caps_the_hold_out(tmp_path: Path, docs: list[str], prepare) -> None:
    index = prepare(write_jsonl(tmp_path / "a.jsonl", docs), tmp_path / "out", val_fraction=0.5,
                    val_max_tokens=300)  # fmt: skip
    val = index.splits["val"].tokens
    assert 300 <= val < 300 + max(len(d) for d in docs)  # stops at the first doc past the cap


@pytest.mark.parametrize("fmt", ["parquet", "txt", "glob", "json-array"])
def test_other_formats_give_the_same_tokens(
    tmp_path: Path, docs: list[str], fmt: str, prepare
) -> None:
    ref = prepare(
        write_jsonl(tmp_path / "ref.jsonl", docs[:40]), tmp_path / "ref", val_fraction=0.1
    )
    if fmt == "parquet":
        src = tmp_path / "a.parquet"
        pq.write_table(pa.table({"body": docs[:40]}), src)
        index = prepare(src, tmp_path / "out", source_kw={"text_field": "body"}, val_fraction=0.1)
    elif fmt == "txt":
        folder = tmp_path / "books"
        folder.mkdir()
        for i, d in enumerate(docs[:40]):  # one document per file, read in name order
            (folder / f"{i:03d}.txt").write_text(d)
        index = prepare(folder, tmp_path / "out", val_fraction=0.1)
    elif fmt == "json-array":
        src = tmp_path / "a.json"
        src.write_text(json.dumps([{"text": d} for d in docs[:40]]))
        index = prepare(src, tmp_path / "out", val_fraction=0.1)
    else:
        write_jsonl(tmp_path / "parts" / "p0.jsonl", docs[:25])
        write_jsonl(tmp_path / "parts" / "p1.jsonl", docs[25:40])
        index = prepare(tmp_path / "parts" / "*.jsonl", tmp_path / "out", val_fraction=0.1)
    for split in ("train", "val"):
        assert np.array_equal(read_split(index, split), read_split(ref, split))


def test_parallel_and_streaming_and_hub_paths_match(
    tmp_path: Path, docs: list[str], prepare, tokenizer_path: Path
) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    kw = dict(val_fraction=0.2, shard_tokens=3000)
    ref = prepare(src, tmp_path / "serial", num_proc=1, **kw)
    expected = shard_bytes(tmp_path / "serial")
    # Worker processes through the real CLI in a fresh interpreter: forking this pytest
    # process, which holds other threads (tqdm's monitor, torch's pools), can deadlock.
    cli = [
        sys.executable, "-m", "kha_train.cli", "data", "prepare", "--source", str(src),
        "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "parallel"),
        "--num-proc", "2", "--val-fraction", "0.2", "--shard-tokens", "3000", "--no-progress",
    ]  # fmt: skip
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prepare(src, tmp_path / "stream", source_kw={"streaming": True}, **kw)
    # The Hub path: load_dataset(NAME, streaming=True, data_files=...) with a packaged builder
    # name and local files, the same datasets API a Hub dataset name goes through.
    hub = prepare("hub:json", tmp_path / "hub", source_kw={"hub_data_files": [str(src)]}, **kw)
    for name in ("parallel", "stream", "hub"):
        assert shard_bytes(tmp_path / name) == expected, name
    assert hub.raw["source"]["spec"] == "hub:json"
    assert ref.splits["train"].tokens == hub.splits["train"].tokens


def test_resume_after_interruption_matches_uninterrupted_run(
    tmp_path: Path, docs, prepare, monkeypatch
) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    kw = dict(val_fraction=0.2, shard_tokens=3000)
    prepare(src, tmp_path / "ref", **kw)
    expected = shard_bytes(tmp_path / "ref")

    out = tmp_path / "out"
    real_write = prep.write_shard
    calls = {"n": 0}

    def crash_on_third_shard(path, arrays, dtype):
        calls["n"] += 1
        if calls["n"] == 5:  # shard 0 and 1 (train + val each) are done; shard 2 is half written
            path.with_name(path.name + ".tmp").write_bytes(b"\x01\x02partial")
            raise KeyboardInterrupt
        return real_write(path, arrays, dtype)

    monkeypatch.setattr(prep, "write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, **kw)
    assert not (out / "index.json").exists()
    assert sorted(p.name for p in out.glob("shard_*.json")) == [
        "shard_00000.json",
        "shard_00001.json",
    ]
    kept = {n: (out / n).stat().st_mtime_ns for n in ("train_00000.bin", "train_00001.bin")}
    monkeypatch.setattr(prep, "write_shard", real_write)

    starts = []
    real_batches = prep._tokenized_batches
    monkeypatch.setattr(prep, "_tokenized_batches",
                        lambda s, o, t, start: (starts.append(start), real_batches(s, o, t, start))[1])  # fmt: skip
    index = prepare(src, out, **kw)
    assert starts and starts[0] > 0  # tokenizing resumed after the committed shards
    assert shard_bytes(out) == expected  # identical to the uninterrupted run
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards untouched
    assert not list(out.glob("*.tmp"))
    assert index.fingerprint == read_index(tmp_path / "ref").fingerprint

    starts.clear()
    prepare(src, out, **kw)  # finished: nothing to do
    assert starts == []


def test_rerun_with_other_settings_is_refused(tmp_path: Path, docs, prepare) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", docs[:30])
    prepare(src, tmp_path / "out", val_fraction=0.1)
    with pytest.raises(
        DataError, match=r"index\.json was written with other settings.*val_fraction"
    ):
        prepare(src, tmp_path / "out", val_fraction=0.3)
    write_jsonl(tmp_path / "a.jsonl", docs[:31])  # the source changed
    with pytest.raises(DataError, match="source_fingerprint"):
        prepare(src, tmp_path / "out", val_fraction=0.1)


def test_uint32_when_the_vocab_does_not_fit_uint16(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kha_train.data.prepare import PrepareOptions, prepare_dataset
    from kha_train.data.sources import SourceSpec

    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    words = [f"w{i}" for i in range(70_000)]
    vocab = {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_path = tmp_path / "big.json"
    tok_path.write_text(wl.to_str())
    docs = [" ".join(words[i * 7 % 70_000 : i * 7 % 70_000 + 50]) for i in range(0, 10_000, 97)]
    docs.append("w69998 w69999 w0")
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    index = prepare_dataset(SourceSpec(spec=str(src)),
                            PrepareOptions(out=str(tmp_path / "out"), tokenizer=str(tok_path),
                                           val_fraction=0.0, progress=False))  # fmt: skip
    assert index.dtype == np.uint32 and index.raw["dtype"] == "uint32"
    tokens = read_split(index, "train")
    assert tokens.max() == 70_000 and tokens[-4:].tolist() == [69_999, 70_000, 1, 0]
    with pytest.raises(DataError, match="--dtype uint16 cannot hold"):
        prepare_dataset(SourceSpec(spec=str(src)),
                        PrepareOptions(out=str(tmp_path / "o2"), tokenizer=str(tok_path),
                                       dtype="uint16", progress=False))  # fmt: skip


def test_forced_uint32_reads_back_the_same(tmp_path: Path, docs, prepare) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", docs[:50])
    small = prepare(src, tmp_path / "u16", val_fraction=0.1)
    big = prepare(src, tmp_path / "u32", val_fraction=0.1, dtype="uint32")
    assert big.dtype == np.uint32 and small.dtype == np.uint16
    for split in ("train", "val"):
        assert np.array_equal(read_split(big, split), read_split(small, split))


def test_cli_data_prepare_builtin(tmp_path: Path, tokenizer_path: Path, tok, capsys) -> None:
    out = tmp_path / "builtin"
    args = ["data", "prepare", "--source", "builtin", "--tokenizer", str(tokenizer_path),
            "--out", str(out), "--max-docs", "30", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    # --no-progress hides progress, not the result.
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"wrote {out}: train ") and line.endswith(", uint16")
    index = read_index(out)
    assert index.raw["source_rows"] == 30 and index.raw["source"]["fingerprint"].startswith(
        "builtin-"
    )
    assert index.splits["train"].tokens > 10_000
    text = tok.decode(read_split(index, "train")[:2000].tolist())
    assert "the" in text and "<|endoftext|>" in text
    mtime = (out / "index.json").stat().st_mtime_ns
    assert main(args) == 0 and (out / "index.json").stat().st_mtime_ns == mtime
    assert "is up to date" in capsys.readouterr().err


def test_directory_source_skips_hidden_and_kha_train_files(tmp_path: Path, docs, prepare) -> None:
    folder = tmp_path / "src"
    write_jsonl(folder / "a.jsonl", docs[:20])
    write_jsonl(folder / ".cache" / "b.jsonl", docs[20:40])
    (folder / "index.json").write_text('{"format": "kha-train-tokens"}')
    (folder / "tokenizer.json").write_text("{}")
    index = prepare(folder, tmp_path / "out", val_fraction=0.0)
    assert index.raw["source_rows"] == 20


@pytest.mark.parametrize("streaming", [False, True])
def test_one_source_mixes_formats(
    tmp_path: Path, docs: list[str], prepare, streaming: bool
) -> None:
    """.jsonl, .parquet and .txt files in one --source: each format is read by its own reader,
    the parts joined in the order their first file appears (name order for a folder)."""
    folder = tmp_path / "mixed"
    write_jsonl(folder / "a.jsonl", docs[:10], field="body")
    large = pa.array(docs[10:20], type=pa.large_string())  # cast to the other parts' type
    pq.write_table(pa.table({"body": large, "n": list(range(10))}), folder / "b.parquet")
    (folder / "c.txt").write_text(docs[20])  # .txt files have no field: their text is used
    write_jsonl(folder / "d" / "e.jsonl", docs[21:30], field="body")
    expected = docs[:10] + docs[21:30] + docs[10:20] + [docs[20]]
    ref = prepare(write_jsonl(tmp_path / "ref.jsonl", expected), tmp_path / "ref", val_fraction=0.3)
    kw = {"text_field": "body", "streaming": streaming}
    index = prepare(folder, tmp_path / "out", source_kw=kw, val_fraction=0.3)
    assert ref.splits["val"].docs > 0
    for split in ("train", "val"):
        assert np.array_equal(read_split(index, split), read_split(ref, split))
    assert index.raw["source_rows"] == 30
    # A comma-separated list keeps its own order: the .txt part first here.
    both = prepare(f"{folder}/c.txt,{folder}/a.jsonl", tmp_path / "list", source_kw=kw,
                   val_fraction=0.0)  # fmt: skip
    ref2 = prepare(write_jsonl(tmp_path / "ref2.jsonl", [docs[20], *docs[:10]]), tmp_path / "ref2",
                   val_fraction=0.0)  # fmt: skip
    assert np.array_equal(read_split(both, "train"), read_split(ref2, "train"))


def test_tokenizer_train_on_a_mixed_source(tmp_path: Path, docs: list[str]) -> None:
    folder = tmp_path / "mixed"
    write_jsonl(folder / "a.jsonl", docs[:100])
    pq.write_table(pa.table({"text": docs[100:200]}), folder / "b.parquet")
    (folder / "c.txt").write_text("\n\n".join(docs[200:240]))
    out = tmp_path / "tok" / "tokenizer.json"
    args = ["tokenizer", "train", "--source", str(folder), "--out", str(out), "--vocab-size",
            "400", "--no-progress", "--txt-sample-by", "paragraph"]  # fmt: skip
    assert main(args) == 0
    info = json.loads((out.parent / "tokenizer_config.json").read_text())["kha_train"]
    assert info["documents"] == 240 and info["vocab_size"] == 400


def test_logs_get_plain_lines_without_terminal_codes(
    tmp_path: Path, docs: list[str], capfd, monkeypatch
) -> None:
    """Output to a file or pipe (not a terminal): no progress bars, carriage returns, escape codes
    or blank lines; the result lines only, plus plain progress lines when a step takes long."""
    import kha_train.data.sources as sources

    src = write_jsonl(tmp_path / "docs.jsonl", docs[:60])

    def run(name: str) -> list[str]:
        tok, ds = tmp_path / name / "tokenizer.json", tmp_path / name / "ds"
        capfd.readouterr()
        assert main(["tokenizer", "train", "--source", str(src), "--out", str(tok),
                     "--vocab-size", "400"]) == 0  # fmt: skip
        assert main(["data", "prepare", "--source", str(src), "--tokenizer", str(tok),
                     "--out", str(ds), "--val-fraction", "0"]) == 0  # fmt: skip
        out, err = capfd.readouterr()
        assert out == "" and "\r" not in err and "\x1b" not in err, repr(err)
        lines = err.splitlines()
        assert all(line.strip() for line in lines), repr(err)  # no blank lines
        assert lines[-1].startswith(f"wrote {ds}: train ") and lines[-1].endswith("uint16")
        assert f"wrote {tok}: vocab 400, eos '<|endoftext|>'" in lines
        return lines

    assert len(run("quick")) == 2  # short steps: nothing but the results
    monkeypatch.setattr(sources, "PROGRESS_EVERY_S", 0.0)  # every step counts as long
    lines = run("slow")
    assert any(re.fullmatch(r"tokenizer train: read \d+ documents \([\d,]+ chars\) \(0m\d\ds\)", x)
               for x in lines)  # fmt: skip
    assert any(
        re.fullmatch(r"tokenizer train: read all 60 documents \([\d,]+ chars\); computing merges "
                     r"\(0m\d\ds\)", x)
        for x in lines
    )  # fmt: skip
    assert any(
        re.fullmatch(r"prepare: 60 of 60 rows \(100%\), [\d,]+ train tokens \(0m\d\ds\)", x)
        for x in lines
    )
    # On a terminal the bars come back (datasets' included), unless --no-progress.
    import datasets

    monkeypatch.setattr(sources, "_is_terminal", lambda stream: True)
    assert sources.progress_bars(True) and datasets.is_progress_bar_enabled()
    assert not sources.progress_bars(False) and not datasets.is_progress_bar_enabled()
