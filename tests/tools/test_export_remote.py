"""`kha-train export` for every model family: the stock class where it is exact, else the
remote-code class (tools/hf, loaded with trust_remote_code=True). Per family: logits equal ours
in fp32, and greedy ``generate`` (KV cache) equals greedy decoding by repeated full forwards of
our model, token for token and logit for logit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model.model_helpers import make_cfg

from kha_train.config import MEAConfig, MLAConfig, ModelConfig
from kha_train.model.transformer import Transformer
from kha_train.tools.export import REMOTE_CLASS, ExportError, export_hf

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is much faster than two fighting over busy
    cores (seen: 70x for the greedy loop on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MLA_TINY = MLAConfig(kv_lora_rank=12, q_lora_rank=10, rope_head_dim=4)


def _model(cfg: ModelConfig, router_bias: bool = False) -> Transformer:
    """A random model whose norms, KHA, HLC and head mixes are away from their init (so a wrong
    mapping shows), and, with router_bias, a random selection bias that decides routing."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("norm", "kha_", "hlc_", "_mix")):
                p.add_(0.2 * torch.randn_like(p))
        if router_bias:
            for block in model.layers:
                if block.is_moe:
                    block.ffn.expert_bias.copy_(0.3 * torch.randn(cfg.moe.num_experts))
    return model.eval()


FAMILIES = {
    # name: (config, non-zero router bias, exported class)
    "dense": (make_cfg(moe=False), False, "Qwen3ForCausalLM"),
    "moe": (make_cfg(tie_embeddings=False), False, "Qwen3MoeForCausalLM"),
    "moe_router_bias": (make_cfg(), True, REMOTE_CLASS),
    "kha_linear": (make_cfg(kha="linear", targets=("q", "k", "v")), False, "Qwen3MoeForCausalLM"),
    "kha_mlp": (make_cfg(kha="mlp"), True, REMOTE_CLASS),  # the quickstart model's kind
    "kha_mlp_qkv_dense": (
        make_cfg(moe=False, kha="mlp", targets=("q", "k", "v")),
        False,
        REMOTE_CLASS,
    ),
    "kha_gate": (make_cfg(kha="gate", tie_embeddings=False), False, REMOTE_CLASS),
    "shared_sigmoid": (
        make_cfg(
            moe_kw={"num_shared_experts": 1, "score_func": "sigmoid", "norm_topk_prob": False}
        ),
        True,
        REMOTE_CLASS,
    ),
    "gta": (make_cfg(attention="gta", kha="mlp", targets=("q", "k", "v")), True, REMOTE_CLASS),
    "mla": (
        make_cfg(
            attention="mla", qk_norm=False, mla=MLA_TINY, kha="linear", targets=("q", "k", "v")
        ),
        True,
        REMOTE_CLASS,
    ),
    "mla_no_q_latent": (
        make_cfg(
            moe=False,
            attention="mla",
            qk_norm=False,
            mla=MLAConfig(kv_lora_rank=12, q_lora_rank=0, rope_head_dim=4),
        ),
        False,
        REMOTE_CLASS,
    ),
    "mea": (make_cfg(attention="mea", kha="mlp"), True, REMOTE_CLASS),
    "mea_virtual": (
        make_cfg(attention="mea", mea=MEAConfig(cached_kv_heads=1), kha="linear", targets=("k",)),
        False,
        REMOTE_CLASS,
    ),
    "talking_heads": (make_cfg(attention="talking_heads", kha="mlp"), False, REMOTE_CLASS),
}


def _load(out: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, trust_remote_code=True, attn_implementation="eager"
    )
    return hf.eval()


def _greedy(model: Transformer, prompt: torch.Tensor, n: int):
    """Greedy decoding by repeated full forwards: tokens [B, T + n] and the logits of each step."""
    ids, steps = prompt, []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids)[:, -1]
            steps.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, steps


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_and_greedy_generate(family, tmp_path) -> None:
    cfg, bias, cls = FAMILIES[family]
    model = _model(cfg, router_bias=bias)
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
    want_ids, want_steps = _greedy(model, tokens[:, :6], NEW_TOKENS)
    export_hf(model, tmp_path / "hf", dtype=torch.float32)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["architectures"] == [cls]
    readme = (tmp_path / "hf" / "README.md").read_text()
    assert f"Class: `{cls}`" in readme and "Why this class" in readme
    hf = _load(tmp_path / "hf")
    assert type(hf).__name__ == cls
    scale = ours.abs().max().item()
    steps: list[int] = []  # tokens per forward during generate: the KV cache is used
    hf.get_input_embeddings().register_forward_hook(lambda m, i, o: steps.append(i[0].shape[1]))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours, atol=1e-4 * scale, rtol=1e-4)
        gen = hf.generate(
            tokens[:, :6],
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )
    assert torch.equal(gen.sequences, want_ids)
    # kha-train generate (greedy, our KV cache) gives the same tokens as HF generate.
    from kha_train.tools.generate import generate

    ours_new = generate(model, tokens[:, :6].tolist(), NEW_TOKENS)
    assert ours_new == gen.sequences[:, 6:].tolist()
    assert steps == [10, 6] + [1] * (NEW_TOKENS - 1)
    for got, want in zip(gen.logits, want_steps, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-4)


def test_remote_export_keeps_our_names_and_the_bias_in_fp32(tmp_path) -> None:
    from safetensors import safe_open

    model = _model(make_cfg(kha="mlp"), router_bias=True)
    export_hf(model, tmp_path / "hf")  # bf16
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        bias = f.get_tensor("model.layers.1.ffn.router.expert_bias")
        up = f.get_tensor("model.layers.0.attn.kha_v.w_up")
    assert bias.dtype == torch.float32 and up.dtype == torch.bfloat16
    assert torch.equal(bias, model.layers[1].ffn.expert_bias)
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["model_type"] == "kha_moe" and conf["kha"] == {"variant": "mlp", "targets": ["v"]}
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_kha.KhaForCausalLM"
    assert "non-zero router selection bias" in (tmp_path / "hf" / "README.md").read_text()
    # The remote code needs only torch and transformers.
    for name in ("modeling_kha.py", "configuration_kha.py"):
        lines = (tmp_path / "hf" / name).read_text().splitlines()
        imports = {
            ln.split()[1].split(".")[0] for ln in lines if ln.startswith(("from ", "import "))
        }
        assert imports <= {"__future__", "typing", "torch", "transformers", ""}, imports


def test_forced_classes(tmp_path) -> None:
    # --hf-class remote for a model the stock class holds: KHA-Linear kept as trained.
    model = _model(make_cfg(kha="linear", targets=("q",)))
    tokens = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(tokens)
    export_hf(model, tmp_path / "r", dtype=torch.float32, hf_class="remote")
    assert model.layers[0].attn.kha_q is not None  # not folded
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "r")(tokens).logits, ours, atol=1e-5, rtol=1e-4)
    # --hf-class stock where it is not exact: refused, naming the reason and the way out.
    with pytest.raises(ExportError, match=r"(?s)KHA-MLP / gate.*export without it"):
        export_hf(_model(make_cfg(kha="mlp")), tmp_path / "s", hf_class="stock")
    with pytest.raises(ExportError, match="--drop-router-bias asks for the stock"):
        export_hf(_model(make_cfg(attention="gta")), tmp_path / "s", drop_router_bias=True)
    with pytest.raises(ExportError, match="keeps the bias"):
        export_hf(model, tmp_path / "s", hf_class="remote", drop_router_bias=True)
    assert not (tmp_path / "s").exists()


def test_cli_exports_the_quickstart_kind_and_left_padding_generates(tmp_path, capsys) -> None:
    """KHA-MLP on V with a loss-free router bias (the quickstart model's kind): no flag needed."""
    from kha_train.cli import main as cli_main
    from kha_train.config import load_config
    from kha_train.tools.weights_io import save_weights

    config = tmp_path / "run.yaml"
    config.write_text(
        f"name: export-remote\ndata:\n  dataset: {tmp_path / 'none'}\n  seq_len: 32\n"
        "model:\n  vocab_size: 97\n  hidden_size: 32\n  num_layers: 2\n  num_heads: 4\n"
        "  num_kv_heads: 2\n  head_dim: 8\n  ffn_size: 48\n  rope_theta: 10000.0\n"
        "  attn_backend: math\n  kha: {variant: mlp, targets: [v]}\n"
        "  moe: {num_experts: 4, top_k: 2, expert_ffn_size: 16, first_k_dense: 1}\n"
    )
    model = _model(load_config(config).model, router_bias=True)
    weights = save_weights(model, tmp_path / "model.safetensors")
    out = tmp_path / "hf"
    argv = ["export", str(weights), "--config", str(config), "--out", str(out), "--dtype", "fp32"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "as KhaForCausalLM (remote code" in printed and "modeling_kha.py" in printed
    hf = _load(out)
    assert hf.config.max_position_embeddings == 32
    tokens = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens[:1]).logits, model(tokens[:1]), atol=1e-5, rtol=1e-4)
        # A left-padded batch: each row generates what it generates alone.
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        both = hf.generate(tokens, attention_mask=mask, **kw)
        alone = hf.generate(tokens[1:, 2:], **kw)
    assert torch.equal(both[1, 2:], alone[0])
    assert torch.equal(both[1, 5:], _greedy(model, tokens[1:, 2:], 4)[0][0, 3:])
