"""`kha-train eval` (kha_train/tools/evaluate.py): per-token NLL equal to a full forward of each
document, sliding windows that score every token once, bits per byte against bytes counted here,
run_eval on a run directory / weights file with the val split, raw .txt / .jsonl sources and
--data, the JSON it writes, and one clear error per bad input."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_helpers import TINY_MODEL_YAML

from kha_train.config import ConfigError, load_config
from kha_train.data.errors import DataError
from kha_train.model import Transformer
from kha_train.tools.evaluate import add_eval_arguments, run_eval
from kha_train.training.scoring import score_documents, sliding_windows

VOCAB = 320
MODEL_YAML = (
    """
name: eval-test
data:
  dataset: {dataset}
  seq_len: 32
train:
  micro_batch_size: 2
  global_batch_tokens: 64
  max_steps: 1
"""
    + TINY_MODEL_YAML
)
VAL_FRACTION = 0.3
# fp32 sums over a few hundred features: two evaluations of one function that batch or pad
# differently agree to about 1e-6 on NLLs of order 5 (see tests/model/model_helpers.py).
TOL = dict(rtol=1e-5, atol=1e-5)


def _docs() -> list[str]:
    from pydoc_data.topics import topics

    docs = [p.strip() for n in sorted(topics) for p in topics[n].split("\n\n")]
    return [d for d in docs if len(d) > 40][:200]


def _tokenizer(path: Path, texts: list[str], vocab: int) -> Path:
    from kha_train.data.tokenizer import save_tokenizer, train_tokenizer

    return save_tokenizer(
        train_tokenizer(texts, vocab), path, eos_token="<|endoftext|>", pad_token=None
    )


def _prepare(root: Path, texts: list[str], tok: Path, out: str) -> Path:
    from kha_train.data.prepare import PrepareOptions, prepare_dataset
    from kha_train.data.sources import SourceSpec

    src = root / f"{out}.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in texts))
    opts = PrepareOptions(
        out=str(root / out), tokenizer=str(tok), val_fraction=VAL_FRACTION, progress=False,
        num_proc=1,
    )  # fmt: skip
    prepare_dataset(SourceSpec(spec=str(src)), opts)
    return root / out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards run 10-100x faster on one intra-op thread than on two when other work
    shares the cores (OpenMP threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tokenizer, a prepared dataset, a model (random weights) saved as a run directory with a
    DCP checkpoint and as a safetensors file with its config."""
    import torch.distributed.checkpoint as dcp

    from kha_train.tools.weights_io import save_weights
    from kha_train.training.checkpoint_checks import MARKER, write_manifest

    root = tmp_path_factory.mktemp("eval")
    texts = _docs()
    tok = _tokenizer(root / "tok" / "tokenizer.json", texts, 300)
    data = _prepare(root, texts, tok, "data")
    config = root / "run.yaml"
    config.write_text(MODEL_YAML.format(dataset=data))
    cfg = load_config(config)
    model = Transformer(cfg.model)
    torch.manual_seed(0)
    model.init_weights()
    model.eval()
    weights = save_weights(model, root / "model.safetensors")
    run = root / "run"
    ckpt = run / "checkpoints" / "step_0000007"
    with warnings.catch_warnings():  # "no process group: saving in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    (ckpt / "config.yaml").write_text(config.read_text())
    (run / "config.yaml").write_text(config.read_text())
    write_manifest(ckpt)
    (ckpt / MARKER).write_text("")
    return dict(root=root, texts=texts, tok=tok, data=data, config=config, model=model,
                weights=weights, run=run)  # fmt: skip


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def _encoded(world: dict, n: int = 12) -> list[list[int]]:
    from kha_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(world["tok"])
    return [[*tok.encode(t), tok.eos_id] for t in world["texts"][:n]]


def _full_nll(model: Transformer, ids: list[int]) -> torch.Tensor:
    """NLL of tokens 1..n-1 of one document from one forward over all of it."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x)[0].float()
    return F.cross_entropy(logits[:-1], x[0, 1:], reduction="none")


def test_token_nll_equals_a_full_forward_of_each_document(world) -> None:
    model, docs = world["model"], _encoded(world)
    window = max(map(len, docs))  # every document in one window
    # Small batches: documents of different lengths share a padded forward.
    scores = list(
        score_documents(model, docs, window=window, stride=1, batch_tokens=3 * window,
                        keep_token_nll=True)
    )  # fmt: skip
    assert len(scores) == len(docs)
    for ids, s in zip(docs, scores):
        expected = _full_nll(model, ids)
        assert s.tokens == len(ids) - 1  # the first token is not predicted; EOS is
        torch.testing.assert_close(s.token_nll, expected, **TOL)
        assert math.isclose(s.nll, float(expected.double().sum()), rel_tol=1e-5)


def test_sliding_windows_score_every_token_once_with_the_promised_context() -> None:
    for n in (1, 2, 5, 8, 9, 17, 40):
        for window, stride in ((8, 1), (8, 3), (8, 4), (8, 7)):
            seen: list[int] = []
            for s, e, f in sliding_windows(n, window, stride):
                assert 0 <= s < f <= e <= n or (n < 2 and e - s == n)
                assert e - s <= window
                for t in range(f, e):
                    assert t - s >= min(t, window - stride)  # left context of token t
                seen += range(f, e)
            assert seen == list(range(1, n))


def test_sliding_window_result(world) -> None:
    model, docs = world["model"], _encoded(world)
    long = [d for d in docs if len(d) > 20][:3]
    assert len(long) >= 3
    full = [_full_nll(model, d) for d in long]
    window = max(map(len, long))
    same = list(score_documents(model, long, window=window, stride=window // 2,
                                keep_token_nll=True))  # fmt: skip
    for s, f in zip(same, full):  # the window covers the document: the full-context result
        torch.testing.assert_close(s.token_nll, f, **TOL)
    for window, stride in ((8, 4), (8, 1), (12, 11)):
        slid = list(
            score_documents(model, long, window=window, stride=stride, batch_tokens=40,
                            keep_token_nll=True)
        )  # fmt: skip
        for ids, s, f in zip(long, slid, full):
            assert s.tokens == len(ids) - 1 and torch.isfinite(s.token_nll).all()
            # Tokens inside the first window saw their whole prefix.
            torch.testing.assert_close(s.token_nll[: window - 1], f[: window - 1], **TOL)
            assert not torch.allclose(s.token_nll, f, **TOL)  # later ones saw less of it
            assert abs(s.nll / s.tokens - f.mean().item()) < 1.0  # ... and stay plausible
            if stride == 1:
                continue  # a forward per token: the other settings check the same below
            # Each later token: the forward over its window, at its place in it.
            for st, e, first in sliding_windows(len(ids), window, stride)[1:]:
                direct = _full_nll(model, ids[st:e])[first - st - 1 :]
                torch.testing.assert_close(s.token_nll[first - 1 : e - 1], direct, **TOL)


def test_bits_per_byte_of_raw_sources_and_the_json(world, tmp_path) -> None:
    from kha_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(world["tok"])
    texts = world["texts"][:6]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts[:2]):
        (txt_dir / f"{i}.txt").write_text(t + "\n")  # one document per file
    out = tmp_path / "out" / "eval.json"
    argv = [str(world["weights"]), "--config", str(world["config"]), "--no-val",
            "--source", f"js={jsonl}", "--source", f"txt={txt_dir}/*.txt",
            "--json", str(out), "--per-doc"]  # fmt: skip
    assert run_eval(_args(*argv)) == 0
    report = json.loads(out.read_text())
    js, tx = report["sources"]
    assert (js["name"], js["kind"], js["docs"], tx["docs"]) == ("js", "text", 6, 2)

    def counted(doc_texts: list[str], score_first: bool) -> tuple[int, int]:
        """(predicted tokens, bytes of the text they spell), counted here."""
        tokens = nbytes = 0
        for t in doc_texts:
            enc = tok.tokenizer.encode(t, add_special_tokens=False)
            tokens += len(enc.ids) + (1 if score_first else 0)  # + EOS - first (unless scored)
            a, b = enc.offsets[0]
            nbytes += len(t.encode()) - (0 if score_first else len(t[a:b].encode()))
        return tokens, nbytes

    txt_texts = [t + "\n" for t in texts[:2]]
    for src, doc_texts in ((js, texts), (tx, txt_texts)):
        assert (src["tokens"], src["bytes"]) == counted(doc_texts, False)
        assert math.isclose(src["bpb"], src["nll"] / (math.log(2) * src["bytes"]), rel_tol=1e-12)
        assert math.isclose(src["loss"], src["nll"] / src["tokens"], rel_tol=1e-12)
        assert math.isclose(src["perplexity"], math.exp(src["loss"]), rel_tol=1e-12)
        assert len(src["per_doc"]) == src["docs"]
        assert sum(d["tokens"] for d in src["per_doc"]) == src["tokens"]
        assert math.isclose(sum(d["nll"] for d in src["per_doc"]), src["nll"], rel_tol=1e-9)
    # The jsonl source's NLL is that of a full forward of each document (they fit the window).
    direct = sum(
        float(_full_nll(world["model"], [*tok.encode(t), tok.eos_id]).double().sum())
        for t in texts
        if len(tok.encode(t)) < 32
    )
    short = [d for d, t in zip(js["per_doc"], texts) if len(tok.encode(t)) < 32]
    assert short and math.isclose(sum(d["nll"] for d in short), direct, rel_tol=1e-5)
    ov = report["overall"]
    assert ov["tokens"] == js["tokens"] + tx["tokens"] and ov["docs"] == 8
    assert math.isclose(ov["bpb"], (js["nll"] + tx["nll"]) / (math.log(2) * ov["bytes"]))
    assert report["settings"]["window"] == 32 and report["settings"]["stride"] == 16
    assert report["model"]["step"] is None  # a weights file

    # --score-first: every byte of the text is predicted, one more token per document.
    assert run_eval(_args(*argv[:-1], "--score-first")) == 0
    js2 = json.loads(out.read_text())["sources"][0]
    assert (js2["tokens"], js2["bytes"]) == counted(texts, True)
    assert js2["bytes"] == sum(len(t.encode()) for t in texts)


def test_run_directory_val_split_and_data(world, tmp_path, capsys) -> None:
    from kha_train.data.shards import read_index

    out = tmp_path / "eval.json"
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"text": world["texts"][0]}) + "\n")
    data = world["data"]
    argv = [str(world["run"]), "--source", f"a={jsonl}", "--data", str(data), "--data",
            f"tr={data}", "--split", "val", "--window", "24", "--json", str(out),
            "--score-first"]  # fmt: skip
    assert run_eval(_args(*argv)) == 0
    text = capsys.readouterr().out
    assert "(step 7)" in text and "overall" in text
    report = json.loads(out.read_text())
    assert report["model"]["step"] == 7 and report["model"]["checkpoint"].endswith("step_0000007")
    names = [s["name"] for s in report["sources"]]
    assert names == ["val", "data:val", "tr", "a"]
    val = report["sources"][0]
    index = read_index(data)
    # --score-first: every token of the split is predicted (an EOS in front of each document).
    assert (val["docs"], val["tokens"]) == (index.splits["val"].docs, index.splits["val"].tokens)
    # Bytes: the held-out documents' text (prepare's rule), counted from the source.
    threshold = int(VAL_FRACTION * 2**64)
    held = [
        t for t in world["texts"]
        if int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
        < threshold
    ]  # fmt: skip
    assert val["bytes"] == sum(len(t.encode()) for t in held)
    assert report["sources"][2]["nll"] == pytest.approx(val["nll"], rel=1e-9)  # same split
    assert math.isfinite(val["bpb"]) and 0 < val["bpb"] < 20

    # Without --score-first each document loses its first token's prediction.
    assert run_eval(_args(str(world["run"]), "--json", str(out), "--max-docs", "5")) == 0
    val = json.loads(out.read_text())["sources"][0]
    assert val["docs"] == 5 and val["tokens"] < 5 * 32 * 10


def test_errors(world, tmp_path) -> None:
    base = [str(world["weights"]), "--config", str(world["config"])]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        run_eval(_args(*base, "--no-val", "--source", f"e={empty}"))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"content": "some text here"}) + "\n")
    with pytest.raises(DataError, match=r"no column 'text'.*--text-field"):
        run_eval(_args(*base, "--no-val", "--source", f"n={nofield}"))
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError, match="holds no document"):
        run_eval(_args(*base, "--no-val", "--source", f"b={blank}"))
    with pytest.raises(ConfigError, match="NAME=PATH"):
        run_eval(_args(*base, "--source", str(nofield)))
    with pytest.raises(ConfigError, match="--stride 32 must be in"):
        run_eval(_args(*base, "--stride", "32"))
    with pytest.raises(ConfigError, match="two texts to score are named val"):
        run_eval(_args(*base, "--source", f"val={nofield}"))
    with pytest.raises(ConfigError, match="nothing to score"):
        run_eval(_args(*base, "--no-val"))
    with pytest.raises(ConfigError, match="nor a run directory"):
        run_eval(_args(str(tmp_path)))
    with pytest.raises(DataError, match=r"not a prepared dataset here.*--no-val"):
        run_eval(_args(base[0], f"data.dataset={tmp_path / 'gone'}", *base[1:]))

    # Tokenizers that are not the model's.
    big = _tokenizer(tmp_path / "big" / "tokenizer.json", world["texts"], 500)
    with pytest.raises(DataError, match=r"has \d+ ids but the model has model.vocab_size=320"):
        run_eval(_args(base[0], f"data.dataset={tmp_path / 'gone'}", *base[1:], "--tokenizer",
                       str(big), "--no-val", "--source", f"x={nofield}"))  # fmt: skip
    other = _tokenizer(tmp_path / "other" / "tokenizer.json", world["texts"][:100], 310)
    with pytest.raises(DataError, match=r"is not the one the run's dataset .* was prepared with"):
        run_eval(_args(*base, "--tokenizer", str(other)))
    other_data = _prepare(tmp_path, world["texts"][:40], other, "other_data")
    with pytest.raises(DataError, match=r"was tokenized with tokenizer .* --source"):
        run_eval(_args(*base, "--data", str(other_data)))


@pytest.mark.slow
def test_two_ranks_shard_the_model_and_agree_with_one_process(world, tmp_path) -> None:
    """Under torchrun the model is sharded by FSDP2 and the batches split over the ranks: the same
    figures, per document too, as one process; also for a run trained as one process without
    FSDP2 (parallel.single_device in its config)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    src = tmp_path / "src.txt"
    src.write_text("\n\n".join(world["texts"][:30]))
    common = [str(world["run"]), "--source", f"txt={src}", "--txt-sample-by", "paragraph",
              "--window", "16", "--stride", "5", "--per-doc", "--batch-tokens", "48"]  # fmt: skip
    one = tmp_path / "one.json"
    run_eval(_args(*common, "--json", str(one), "--device", "cpu"))
    two = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "kha_train.cli", "eval", common[0], "parallel.single_device=true", *common[1:],
           "--json", str(two), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["settings"]["ranks"] == 2
    for sa, sb in zip(a["sources"], b["sources"], strict=True):
        assert (sa["name"], sa["docs"], sa["tokens"], sa["bytes"]) == (
            sb["name"], sb["docs"], sb["tokens"], sb["bytes"],
        )  # fmt: skip
        assert sb["loss"] == pytest.approx(sa["loss"], rel=1e-5)
        assert [d["loss"] for d in sb["per_doc"]] == pytest.approx(
            [d["loss"] for d in sa["per_doc"]], rel=1e-5, abs=1e-6
        )
    # A weights file is the whole model: sharding it is refused with the way out.
    bad = subprocess.run(
        [*cmd[:6], "-m", "kha_train.cli", "eval", str(world["weights"]), "--config",
         str(world["config"]), "--device", "cpu"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert bad.returncode != 0 and "evaluate it without torchrun" in bad.stderr
