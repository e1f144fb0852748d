"""`kha-train export`: tiny models exported to transformers Qwen3-MoE / Qwen3, loaded back with
``from_pretrained`` (local folder) and compared logit by logit; models they cannot hold go to the
remote-code class (tests/tools/test_export_remote.py tests that class family by family)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model.model_helpers import make_cfg

from kha_train.cli import main as cli_main
from kha_train.config import ModelConfig
from kha_train.model.transformer import Transformer
from kha_train.tools.export import ExportError, export_hf
from kha_train.tools.weights_io import save_weights

transformers = pytest.importorskip("transformers")


def _cfg(moe: bool = True, kha: str = "none", targets=("v",), **kw) -> ModelConfig:
    """The model tests' tiny config at width 64 (head_dim 16, FFN 96, expert FFN 32, vocab 101):
    3 layers; MoE: 4 experts top-2, layer 0 dense (first_k_dense=1)."""
    moe_kw = {"expert_ffn_size": 32, **kw.pop("moe_kw", {})} if moe else kw.pop("moe_kw", {})
    sizes = dict(vocab_size=101, hidden_size=64, head_dim=16, ffn_size=96, norm_eps=1e-6)
    return make_cfg(moe=moe, kha=kha, targets=targets, moe_kw=moe_kw, **{**sizes, **kw})


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    with torch.no_grad():  # norms and KHA start at 1 / I: move them so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or "kha_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def _conf(out: Path):
    """The exported config as the installed transformers reads it."""
    return transformers.AutoConfig.from_pretrained(out)


def _hf_logits(out: Path, cls_name: str, tokens: torch.Tensor) -> torch.Tensor:
    hf = getattr(transformers, cls_name).from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    hf.eval()
    with torch.no_grad():
        return hf(tokens).logits


def _assert_same_logits(model: Transformer, out: Path, cls_name: str) -> None:
    tokens = _tokens(model.cfg)
    with torch.no_grad():
        ours = model(tokens)
    theirs = _hf_logits(out, cls_name, tokens)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_moe_matches_qwen3_moe(tmp_path) -> None:
    cfg = _cfg(tie_embeddings=False)
    model = _model(cfg)
    with torch.no_grad():
        ref = model(_tokens(cfg))
    written = export_hf(model, tmp_path / "hf", dtype=torch.float32)
    assert [p.name for p in written] == ["config.json", "model.safetensors", "README.md"]
    assert "Class: `Qwen3MoeForCausalLM` (stock" in (tmp_path / "hf" / "README.md").read_text()
    conf = _conf(tmp_path / "hf")
    assert conf.model_type == "qwen3_moe" and conf.architectures == ["Qwen3MoeForCausalLM"]
    assert conf.mlp_only_layers == [0] and conf.decoder_sparse_step == 1
    assert (conf.num_experts, conf.num_experts_per_tok) == (4, 2)
    assert (conf.moe_intermediate_size, conf.intermediate_size) == (32, 96)
    assert conf.head_dim == 16 and conf.norm_topk_prob is True and conf.rms_norm_eps == 1e-6
    assert conf.tie_word_embeddings is False and conf.router_aux_loss_coef == 0.0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" in keys and "model.layers.1.mlp.experts.3.down_proj.weight" in keys
    assert (
        "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.1.mlp.gate.weight" in keys
    )
    # The export did not change what the model computes.
    with torch.no_grad():
        torch.testing.assert_close(model(_tokens(cfg)), ref)
    _assert_same_logits(model, tmp_path / "hf", "Qwen3MoeForCausalLM")


def test_kha_linear_on_qkv_is_folded(tmp_path) -> None:
    model = _model(_cfg(kha="linear", targets=("q", "k", "v")))
    tokens = _tokens(model.cfg)
    with torch.no_grad():
        before = model(tokens)
    export_hf(model, tmp_path / "hf", dtype=torch.float32)
    assert model.layers[0].attn.kha_q is None  # folded in place
    theirs = _hf_logits(tmp_path / "hf", "Qwen3MoeForCausalLM", tokens)
    torch.testing.assert_close(theirs, before, atol=1e-4, rtol=1e-4)


def test_dense_matches_qwen3(tmp_path) -> None:
    model = _model(_cfg(moe=False))
    export_hf(model, tmp_path / "hf", dtype=torch.float32)
    conf = _conf(tmp_path / "hf")
    assert conf.model_type == "qwen3" and conf.tie_word_embeddings is True
    _assert_same_logits(model, tmp_path / "hf", "Qwen3ForCausalLM")


def test_moe_every_other_layer(tmp_path) -> None:
    cfg = _cfg(num_layers=4, moe_kw={"moe_every_n": 2})  # MoE in layers 1 and 3
    model = _model(cfg)
    export_hf(model, tmp_path / "hf", dtype=torch.float32)
    conf = _conf(tmp_path / "hf")
    assert conf.decoder_sparse_step == 2 and conf.mlp_only_layers == []
    _assert_same_logits(model, tmp_path / "hf", "Qwen3MoeForCausalLM")


@pytest.mark.parametrize(
    "cfg, match",
    [
        (_cfg(kha="mlp"), "KHA-MLP / gate is a nonlinear"),
        (_cfg(kha="gate"), "model.kha.variant=gate"),
        (_cfg(attention="mla", qk_norm=False), "model.attention=mla"),
        (_cfg(moe_kw={"num_shared_experts": 1}), "shared experts"),
        (_cfg(moe_kw={"score_func": "sigmoid"}), "softmax"),
    ],
)
def test_models_qwen3_cannot_hold_go_to_the_remote_class(cfg, match, tmp_path) -> None:
    model = Transformer(cfg)
    model.init_weights()
    with pytest.raises(ExportError, match=match):  # asked for the stock class: refused
        export_hf(model, tmp_path / "hf", hf_class="stock")
    assert not (tmp_path / "hf").exists()
    export_hf(model, tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == ["KhaForCausalLM"] and conf["model_type"] == "kha_moe"
    assert match in (tmp_path / "hf" / "README.md").read_text()


def test_router_bias_keeps_the_remote_class_or_is_dropped_on_request(tmp_path, capsys) -> None:
    model = _model(_cfg())
    with torch.no_grad():
        model.layers[2].ffn.expert_bias.copy_(torch.tensor([0.1, -0.1, 0.0, 0.0]))
    with pytest.raises(ExportError, match=r"(?s)layers \[2\].*--drop-router-bias"):
        export_hf(model, tmp_path / "s", hf_class="stock")
    # By default the bias is kept: the remote-code class (no flag needed).
    export_hf(model, tmp_path / "r", dtype=torch.float32)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["architectures"] == [
        "KhaForCausalLM"
    ]
    # --drop-router-bias: an explicit choice for the stock class.
    export_hf(model, tmp_path / "hf", dtype=torch.float32, drop_router_bias=True)
    assert "routes tokens differently" in capsys.readouterr().err
    assert "DROPPED" in (tmp_path / "hf" / "README.md").read_text()
    # What is exported is the model without the bias.
    with torch.no_grad():
        model.layers[2].ffn.expert_bias.zero_()
    _assert_same_logits(model, tmp_path / "hf", "Qwen3MoeForCausalLM")


def _write_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run config whose dataset index.json names a tokenizer; returns (config, tokenizer)."""
    tok = tmp_path / "tok" / "tokenizer.json"
    tok.parent.mkdir()
    tok.write_text('{"version": "1.0"}')
    data = tmp_path / "data"
    data.mkdir()
    (data / "index.json").write_text(json.dumps({"tokenizer": {"path": str(tok), "eos_id": 7}}))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"name: export-test\ndata:\n  dataset: {data}\n  seq_len: 64\n"
        "model:\n  vocab_size: 101\n  hidden_size: 64\n  num_layers: 2\n  num_heads: 4\n"
        "  num_kv_heads: 2\n  head_dim: 16\n  ffn_size: 96\n  rope_theta: 10000.0\n"
        "  attn_backend: math\n  kha: {variant: linear, targets: [v]}\n"
        "  moe: {num_experts: 4, top_k: 2, expert_ffn_size: 32, first_k_dense: 1}\n"
    )
    return config, tok


@pytest.mark.filterwarnings("ignore:.*single process")
def test_cli_from_checkpoint_folder(tmp_path, capsys) -> None:
    """The trainer's layout: DCP entries model.* (and optim.*), config.yaml beside them."""
    import torch.distributed.checkpoint as dcp

    from kha_train.config import load_config

    config, _ = _write_run(tmp_path)
    model = _model(load_config(config).model)
    ckpt = tmp_path / "checkpoints" / "step_0000010"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    (ckpt / "config.yaml").write_text(config.read_text())
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "hf"), "--dtype", "fp32"]) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    _assert_same_logits(model, tmp_path / "hf", "Qwen3MoeForCausalLM")


def test_cli_from_weights_file(tmp_path, capsys) -> None:
    # A dataset folder whose index.json names a tokenizer: it is copied beside the model.
    config, tok = _write_run(tmp_path)
    from kha_train.config import load_config

    model = _model(load_config(config).model)
    weights = save_weights(model, tmp_path / "model.safetensors")
    out = tmp_path / "hf"
    argv = ["export", str(weights), "--config", str(config), "--out", str(out)]
    assert cli_main([*argv, "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "as Qwen3-MoE (fp32)" in printed and "tokenizer.json" in printed
    assert (out / "tokenizer.json").read_text() == tok.read_text()
    conf = _conf(out)
    assert conf.eos_token_id == 7 and conf.max_position_embeddings == 64
    _assert_same_logits(model, out, "Qwen3MoeForCausalLM")
    # Refusals are one-line errors: an existing output folder; a weights file without --config.
    assert cli_main(argv) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert cli_main(["export", str(weights), "--out", str(tmp_path / "x")]) == 2
    assert "give its run config with --config" in capsys.readouterr().err
    # bf16 (the default) halves the file.
    assert cli_main(["export", str(weights), "--config", str(config), "--out", str(out) + "2"]) == 0
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["dtype"] == "bfloat16"
