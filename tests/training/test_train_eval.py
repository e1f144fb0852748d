"""In-loop evaluation (eval.sets, training/evaluator.py): records every eval.every steps and at the
end, figures equal to `kha-train eval` on the saved checkpoint, one fixed batch shape, and one
clear error per bad set before any model is built."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import pytest
from train_helpers import build, records, tiny_config, train_here

from kha_train.config import ConfigError
from kha_train.config_checks import validate
from kha_train.data.errors import DataError
from kha_train.tools.evaluate import add_eval_arguments, run_eval
from kha_train.training import distributed as D
from kha_train.training.trainer import Trainer

# fp32: the same NLLs summed in another batching order.
TOL = dict(rel=1e-5, abs=1e-6)


def _texts(path: Path) -> Path:
    """A raw-text set unlike the training text: a few long documents (sliding windows) and short
    ones, as .jsonl."""
    from codecs import decode
    from this import s as rot13  # the Zen of Python (printed at import; pytest captures it)

    zen = decode(rot13, "rot13")
    docs = [zen, zen.upper(), "short one.", " ".join(zen.split()[:40])]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _cli_eval(run: Path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = run / "eval.json"
    run_eval(parser.parse_args([str(run), *extra, "--json", str(out), "--device", "cpu"]))
    return json.loads(out.read_text())


def test_in_loop_eval_matches_kha_train_eval(tmp_path, tiny_dataset) -> None:
    texts = _texts(tmp_path / "texts.jsonl")
    run = tmp_path / "run"
    sets = {"zen": str(texts), "held": str(tiny_dataset)}
    train_here(tiny_config(run, tiny_dataset, eval={"sets": sets, "every": 4}))
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [4, 6]  # every 4 steps, and at the end (step 6)
    for r in evals:
        for name in sets:
            assert r[f"{name}/loss"] > 0 and r[f"{name}/bpb"] > 0 and r[f"{name}/tokens"] > 0
        assert r["seconds"] > 0 and 0 < r["share"] < 1
    assert evals[0]["zen/loss"] != evals[1]["zen/loss"]  # the model moved in between

    # The same text scored by `kha-train eval` on the final checkpoint (window = seq_len = 32,
    # stride 16 by default in both) gives the same figures.
    report = _cli_eval(
        run, "--no-val", "--source", f"zen={texts}", "--data", f"held={tiny_dataset}"
    )
    got = {s["name"]: s for s in report["sources"]}
    last = evals[-1]
    for name in sets:
        assert last[f"{name}/tokens"] == got[name]["tokens"]
        assert last[f"{name}/loss"] == pytest.approx(got[name]["loss"], **TOL)
        assert last[f"{name}/bpb"] == pytest.approx(got[name]["bpb"], **TOL)
    metrics = (run / "metrics.jsonl").read_text()
    assert '"type": "eval"' in metrics


def test_max_tokens_takes_whole_documents(tmp_path, tiny_dataset) -> None:
    from kha_train.training.evaluator import build_evaluator

    texts = _texts(tmp_path / "texts.jsonl")
    cfg = build(tiny_config(tmp_path / "r", tiny_dataset, eval={"sets": {"zen": str(texts)}}))
    from kha_train.data.shards import read_index

    index = read_index(tiny_dataset)
    full = build_evaluator(cfg, index).sets[0]
    cfg.eval.max_tokens = 1  # the first document alone reaches it
    first = build_evaluator(cfg, index).sets[0]
    assert full.docs == 4 and first.docs == 1 and 0 < first.tokens < full.tokens
    shapes = {tuple(t.shape) for b in full.batches for t in b}
    assert shapes == {(2, 32)}  # one shape: micro_batch_size x seq_len


def test_sample_documents_spreads_over_the_set() -> None:
    from kha_train.training.evaluator import sample_documents

    lengths = [10] * 100  # a set of 1,000 tokens in 100 documents
    picked = sample_documents(lengths, 200)
    assert picked == sample_documents(lengths, 200)  # the same sample in every run
    assert picked == sorted(set(picked)) and len(picked) == 20  # 20 whole documents
    # From the whole set, not its first documents (those of one source, in a prepared split).
    assert min(picked) < 50 <= max(picked) and picked != list(range(20))
    assert sample_documents(lengths, 10**6) == list(range(100))  # a small set: all of it
    assert 3 not in sample_documents([5, 5, 5, 1, 5], 10**6)  # a lone EOS predicts nothing


@pytest.mark.parametrize("kind", ["prepared", "raw"])
def test_pick_sample_scores_the_sampled_documents(tmp_path, tiny_dataset, kind) -> None:
    """eval.pick=sample takes the documents sample_documents draws from the whole set (prepared
    val split or raw text), eval.pick=first the leading ones; both whole documents."""
    from kha_train.data.documents import dataset_documents, source_documents
    from kha_train.data.shards import read_index
    from kha_train.data.sources import SourceSpec
    from kha_train.training.evaluator import build_evaluator, run_tokenizer, sample_documents

    spec = str(tiny_dataset) if kind == "prepared" else str(_texts(tmp_path / "texts.jsonl"))
    cfg = build(tiny_config(tmp_path / "r", tiny_dataset, eval={"sets": {"s": spec}}))
    index = read_index(tiny_dataset)
    tok = run_tokenizer(cfg, index)
    if kind == "prepared":
        docs = list(dataset_documents(index, "val", tok))
    else:
        docs = list(source_documents(SourceSpec(spec=spec), tok, tmp_path / "work"))
    assert len(docs) >= 4
    lengths = [len(d.ids) for d in docs]
    cfg.eval.max_tokens = sum(lengths) // 3  # a third of the set
    picked = sample_documents(lengths, cfg.eval.max_tokens)
    assert 0 < len(picked) < len(docs)

    got = build_evaluator(cfg, index).sets[0]  # the default: sample
    assert got.docs == len(picked)
    assert got.tokens == sum(lengths[i] - 1 for i in picked)
    assert got.nbytes == sum(docs[i].nbytes for i in picked)

    cfg.eval.pick = "first"
    first = build_evaluator(cfg, index).sets[0]
    n, total = 0, 0
    while total < cfg.eval.max_tokens:
        total += lengths[n]
        n += 1
    assert first.docs == n and first.tokens == sum(x - 1 for x in lengths[:n])


def test_bad_sets_fail_before_the_model_is_built(tmp_path, tiny_dataset, monkeypatch) -> None:
    import kha_train.training.trainer as trainer_module

    def no_model(*a, **k):
        raise AssertionError("the model was built before the eval sets were checked")

    monkeypatch.setattr(trainer_module, "build_model", no_model)
    run = tmp_path / "run"
    missing = tiny_config(run, tiny_dataset, eval={"sets": {"wiki": str(tmp_path / "nope.jsonl")}})
    with pytest.raises(DataError, match=r"eval\.sets\.wiki"):
        Trainer(build(missing), console=io.StringIO())
    D.teardown()

    other = tmp_path / "other"  # the run's data, but with another tokenizer recorded
    shutil.copytree(tiny_dataset, other)
    index = json.loads((other / "index.json").read_text())
    index["tokenizer"]["hash"] = "0" * len(index["tokenizer"]["hash"])
    (other / "index.json").write_text(json.dumps(index))
    mismatched = tiny_config(run, tiny_dataset, eval={"sets": {"o": str(other)}})
    with pytest.raises(DataError, match="prepared with tokenizer"):
        Trainer(build(mismatched), console=io.StringIO())
    D.teardown()


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ({"every": -1}, "eval.every"),
        ({"stride": 32}, "eval.stride"),
        ({"window": 1}, "eval.window"),
        ({"batch_rows": 0}, "eval.batch_rows"),
        ({"sets": {"a/b": "x.jsonl"}}, "without '/'"),
    ],
)
def test_config_errors(tmp_path, tiny_dataset, section, match) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(build(tiny_config(tmp_path, tiny_dataset, eval=section)))
