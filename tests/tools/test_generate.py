"""`kha-train generate` (kha_train/tools/generate.py): greedy decoding over the KV cache equals
argmax decoding by full forwards, batched prompts of different lengths, seeded sampling, EOS,
and the command from a weights file and from a run directory, with a tiny tokenizer."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch

from kha_train.config import KHAConfig, ModelConfig, MoEConfig
from kha_train.model import Transformer
from kha_train.tools.commands import add_generate_arguments
from kha_train.tools.generate import Sampling, generate, run_generate, sample_next
from kha_train.tools.weights_io import save_weights

VOCAB = 300


def _model(attention: str = "gqa", moe: bool = False, seed: int = 0) -> Transformer:
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        ffn_size=48, rope_theta=10000.0, attn_backend="math", attention=attention,
        tie_embeddings=False,  # tied, a random model just repeats its last token
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=16) if moe else MoEConfig(),
        kha=KHAConfig(variant="mlp", targets=["v"]),
    )  # fmt: skip
    model = Transformer(cfg)
    torch.manual_seed(seed)
    model.init_weights()
    return model.eval()


def _argmax_by_full_forwards(model: Transformer, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


PROMPTS = [[5, 17, 42, 8, 99, 3, 250], [7], [11, 12, 13]]


@pytest.mark.parametrize("attention", ["gqa", "mea"])
def test_greedy_equals_argmax_of_full_forwards(attention) -> None:
    model = _model(attention)
    expected = [_argmax_by_full_forwards(model, p, 8) for p in PROMPTS]
    assert generate(model, PROMPTS, 8) == expected  # one left-padded batch
    assert generate(model, PROMPTS[:1], 8) == expected[:1]


def test_eos_stops_each_sequence() -> None:
    model = _model()
    full = [_argmax_by_full_forwards(model, p, 8) for p in PROMPTS]
    eos = full[0][3]
    out = generate(model, PROMPTS, 8, eos_id=eos)
    for got, ref in zip(out, full):
        assert got == (ref[: ref.index(eos)] if eos in ref else ref)
    assert len(out[0]) == 3


def test_seeded_sampling_is_reproducible() -> None:
    model = _model(moe=True)
    s = Sampling(temperature=1.0, top_k=50, top_p=0.9)

    def run(seed: int) -> list[list[int]]:
        return generate(model, PROMPTS, 6, s, generator=torch.Generator().manual_seed(seed))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_sampling_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    greedy = [1, 0]
    assert sample_next(logits, Sampling(temperature=0.0)).tolist() == greedy
    assert sample_next(logits, Sampling(top_k=1), g).tolist() == greedy
    assert sample_next(logits, Sampling(top_p=1e-6), g).tolist() == greedy
    # top-k 2 / top-p 0.8 never pick outside the two most likely tokens, and pick both.
    many = logits.repeat(200, 1)  # (400, 4): rows alternate between the two
    for s in (Sampling(temperature=5.0, top_k=2), Sampling(temperature=1.0, top_p=0.8)):
        picks = sample_next(many, s, g).view(200, 2)
        assert set(picks[:, 0].tolist()) == {1, 3} and set(picks[:, 1].tolist()) == {0, 3}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    from kha_train.data.tokenizer import save_tokenizer, train_tokenizer

    docs = [p.strip() for n in sorted(topics) for p in topics[n].split("\n\n")]
    docs = [d for d in docs if len(d) > 40][:300]
    root = tmp_path_factory.mktemp("gen") / "data"
    return save_tokenizer(
        train_tokenizer(docs, VOCAB), root / "tokenizer.json", eos_token="<|endoftext|>",
        pad_token=None,
    )  # fmt: skip


def _write_config(path: Path, dataset: Path) -> Path:
    path.write_text(
        f"name: gen-test\ndata:\n  dataset: {dataset}\n  seq_len: 64\nmodel:\n"
        f"  vocab_size: {VOCAB}\n  hidden_size: 32\n  num_layers: 2\n  num_heads: 4\n"
        "  num_kv_heads: 2\n  head_dim: 8\n  ffn_size: 48\n  rope_theta: 10000.0\n"
        "  tie_embeddings: false\n"
        "  attn_backend: math\n  kha:\n    variant: mlp\n    targets: [v]\n"
    )
    return path


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    return run_generate(parser.parse_args(argv))


def test_command_from_a_weights_file(tokenizer, tmp_path, capsys) -> None:
    from kha_train.data.tokenizer import load_tokenizer

    model = _model()
    weights = save_weights(model, tmp_path / "model.safetensors")
    config = _write_config(tmp_path / "run.yaml", tokenizer.parent)  # tokenizer.json beside
    argv = [str(weights), "--config", str(config), "--max-new-tokens", "6", "--ignore-eos"]
    assert _run([*argv, "--prompt", "The class", "--temperature", "0"]) == 0
    tok = load_tokenizer(tokenizer)
    ids = tok.encode("The class")
    expected = tok.decode(_argmax_by_full_forwards(model, ids, 6))
    assert capsys.readouterr().out == "The class" + expected + "\n"  # streamed, then newline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The class\n\nA function is\n")
    assert _run([*argv, "--prompts-file", str(prompts), "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.count("--- prompt ") == 2 and "A function is" in first
    assert _run([*argv, "--prompts-file", str(prompts), "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


def test_command_from_a_run_directory(tokenizer, tmp_path, capsys) -> None:
    """A run directory resolves to its newest complete checkpoint (a DCP folder)."""
    import torch.distributed.checkpoint as dcp

    model = _model(seed=4)
    run = tmp_path / "run"
    for step, m in ((1, _model(seed=5)), (2, model)):
        ckpt = run / "checkpoints" / f"step_{step:07d}"
        with warnings.catch_warnings():  # "assuming ... a single process": yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": m.state_dict()}, checkpoint_id=str(ckpt))
        _write_config(ckpt / "config.yaml", tokenizer.parent)
        (ckpt / "COMPLETE").write_text("")
    argv = [str(run), "--prompt", "The class", "--temperature", "0", "--max-new-tokens", "5"]
    assert _run([*argv, "--ignore-eos"]) == 0
    from kha_train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    expected = tok.decode(_argmax_by_full_forwards(model, tok.encode("The class"), 5))
    assert capsys.readouterr().out == "The class" + expected + "\n"


def test_command_errors(tokenizer, tmp_path) -> None:
    from kha_train.config import ConfigError

    with pytest.raises(ConfigError, match="no complete checkpoint"):
        _run([str(tmp_path), "--prompt", "x"])
    weights = save_weights(_model(), tmp_path / "model.safetensors")
    config = _write_config(tmp_path / "run.yaml", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="--tokenizer"):
        _run([str(weights), "--config", str(config), "--prompt", "x"])
