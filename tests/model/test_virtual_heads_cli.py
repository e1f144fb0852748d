"""`kha-train virtual-heads`: from a trainer checkpoint folder or a weights file, held-out loss
before and after, converted weights + config written; bad input is a one-line error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from model_helpers import TINY_MODEL_YAML

from kha_train.cli import main as cli_main
from kha_train.config import load_config
from kha_train.model import Transformer
from kha_train.tools.weights_io import load_weights, save_weights

MODEL_YAML = (
    """
name: vh-test
data:
  dataset: {dataset}
  seq_len: 16
train:
  micro_batch_size: 2
  global_batch_tokens: 32
  max_steps: 1
"""
    + TINY_MODEL_YAML
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small prepared dataset (train + val split) of real English text."""
    from pydoc_data.topics import topics

    from kha_train.data.prepare import PrepareOptions, prepare_dataset
    from kha_train.data.sources import SourceSpec
    from kha_train.data.tokenizer import save_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("vh")
    docs = [p.strip() for n in sorted(topics) for p in topics[n].split("\n\n")]
    docs = [d for d in docs if len(d) > 40][:300]
    tok = save_tokenizer(
        train_tokenizer(docs, 300), root / "tok" / "tokenizer.json", eos_token="<|endoftext|>",
        pad_token=None,
    )  # fmt: skip
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    opts = PrepareOptions(
        out=str(root / "data"), tokenizer=str(tok), val_fraction=0.3, progress=False, num_proc=1
    )
    prepare_dataset(SourceSpec(spec=str(root / "docs.jsonl")), opts)
    return root / "data"


@pytest.fixture
def trained(dataset, tmp_path) -> tuple[Path, Transformer]:
    """A config file and a model briefly trained on the dataset (so the loss means something)."""
    config = tmp_path / "run.yaml"
    config.write_text(MODEL_YAML.format(dataset=dataset))
    cfg = load_config(config)
    model = Transformer(cfg.model)
    torch.manual_seed(0)
    model.init_weights()
    from kha_train.data.loader import PackedLoader

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = PackedLoader(
        dataset, "train", seq_len=16, micro_batch_size=8, global_batch_size=8, prefetch=0
    )
    with loader:
        for _ in range(15):
            b = next(loader)
            model(b.input_ids, b.labels).backward()
            opt.step()
            opt.zero_grad()
    return config, model


def _losses(out: str) -> tuple[float, float]:
    m = re.search(r"before ([\d.]+), after ([\d.]+) \(([+-][\d.]+)\)", out)
    assert m, out
    return float(m.group(1)), float(m.group(2))


def test_from_a_weights_file(trained, tmp_path, capsys) -> None:
    config, model = trained
    weights = save_weights(model, tmp_path / "model.safetensors")
    out = tmp_path / "vh" / "model_1kv.safetensors"
    argv = ["virtual-heads", str(weights), "--config", str(config), "--kv-heads", "1"]
    assert cli_main([*argv, "--batches", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 -> 1 cached KV heads per layer (KV cache 32 -> 16 values per token" in text
    before, after = _losses(text)
    assert after != before
    # The written weights + config are the converted model, and reproduce the reported loss.
    cfg = load_config(out.with_suffix(".yaml"))
    assert cfg.model.attention == "mea" and cfg.model.mea.cached_kv_heads == 1
    converted = Transformer(cfg.model)
    converted.init_weights()
    load_weights(converted, out)
    assert converted.layers[0].attn.k_proj.weight.shape == (8, 32)
    # Full rank loses nothing.
    assert cli_main([*argv[:-1], "2", "--batches", "4"]) == 0
    before_full, after_full = _losses(capsys.readouterr().out)
    assert before_full == before and abs(after_full - before_full) < 1e-4


@pytest.mark.filterwarnings("ignore:.*single process")
def test_from_a_trainer_checkpoint_folder(trained, tmp_path, capsys) -> None:
    """The trainer's layout: DCP entries model.* and optim.*, config.yaml beside them."""
    import torch.distributed.checkpoint as dcp

    config, model = trained
    ckpt = tmp_path / "checkpoints" / "step_0000015"
    state = {"model": model.state_dict(), "optim": {"step": torch.tensor(15.0)}}
    dcp.save(state, checkpoint_id=str(ckpt))
    (ckpt / "config.yaml").write_text(config.read_text())
    assert cli_main(["virtual-heads", str(ckpt), "--kv-heads", "1", "--batches", "2"]) == 0
    before, after = _losses(capsys.readouterr().out)
    weights = save_weights(model, tmp_path / "same.safetensors")
    argv = ["virtual-heads", str(weights), "--config", str(config), "--kv-heads", "1"]
    assert cli_main([*argv, "--batches", "2"]) == 0
    assert _losses(capsys.readouterr().out) == (before, after)


def test_bad_input_is_a_clear_error(trained, tmp_path, capsys) -> None:
    config, model = trained
    weights = save_weights(model, tmp_path / "model.safetensors")
    cases = [
        (["virtual-heads", str(weights), "--kv-heads", "1"], "give its run config with --config"),
        (
            ["virtual-heads", str(weights), "model.num_kv_heads=4", "--config", str(config),
             "--kv-heads", "1"],
            "holds weights of another model",
        ),
        (
            ["virtual-heads", str(weights), "--config", str(config), "--kv-heads", "3"],
            "in [1, model.num_kv_heads=2], got 3",
        ),
        (
            ["virtual-heads", str(weights), "--config", str(config), "--kv-heads", "1",
             "--out", str(weights)],
            "must be a new .safetensors path",
        ),
        (["virtual-heads", str(tmp_path), "--kv-heads", "1", "--config", str(config)],
         "not a trainer checkpoint"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
