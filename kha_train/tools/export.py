"""`kha-train export`: a trained model as a Hugging Face transformers checkpoint.

MoE models become Qwen3-MoE (``Qwen3MoeForCausalLM``), dense models Qwen3 (``Qwen3ForCausalLM``):
the same pre-norm blocks, QK-norm, half-split RoPE, softmax top-k router and SwiGLU experts
(/work/shared/papers/NOTES.md section 3). KHA-Linear is folded into the projections first
(absorb.py, exact); everything Qwen3 has no place for is refused with the reason and the fix:
KHA-MLP / gate, attention variants other than gqa, shared experts, sigmoid router scores, and a
non-zero loss-free selection bias (unless --drop-router-bias, which changes routing).

The output folder holds config.json (built by transformers' own config class, so it is what the
installed version reads), model.safetensors with Hub key names, and the dataset's tokenizer
where one is found. Torch and transformers are imported inside the functions (fast --help).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kha_train.config import Config, ModelConfig
    from kha_train.model.transformer import Transformer

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


class ExportError(ValueError):
    """A model Qwen3 / Qwen3-MoE cannot represent, or a bad output folder; names the fix."""


def run_export(args: argparse.Namespace) -> int:
    import torch

    from kha_train.tools.weights_io import load_model, load_source_config

    source = Path(args.source)
    out = Path(args.out)
    _check_out(out)
    cfg = load_source_config(source, args.config)
    check_exportable(cfg.model)  # before reading any weights
    model = load_model(cfg.model, source, "cpu")
    written = export_hf(
        model,
        out,
        dtype=getattr(torch, DTYPES[args.dtype]),
        drop_router_bias=args.drop_router_bias,
        run_cfg=cfg,
    )
    kind = "Qwen3-MoE" if cfg.model.moe.num_experts else "Qwen3"
    print(f"exported {source} as {kind} ({args.dtype}) to {out}:")
    for path in written:
        print(f"  {path.name}")
    return 0


def check_exportable(m: ModelConfig) -> None:
    """Raise :class:`ExportError` if a model of config ``m`` has no Qwen3(-MoE) equivalent."""
    from kha_train.config import AttentionKind, KHAVariant, ScoreFunc

    problems = []
    if AttentionKind(m.attention) != AttentionKind.gqa:
        problems.append(
            f"model.attention={m.attention}: Qwen3 has only grouped-query attention; export "
            "works for model.attention=gqa models"
        )
    if KHAVariant(m.kha.variant) in (KHAVariant.mlp, KHAVariant.gate):
        problems.append(
            f"model.kha.variant={m.kha.variant}: KHA-MLP / gate is a nonlinear per-head transform "
            "that cannot be folded into the projections and Qwen3 attention has no place for it; "
            "export works for models trained with model.kha.variant=linear (folded exactly) or none"
        )
    if not m.qk_norm:
        problems.append(
            "model.qk_norm=false: Qwen3 always applies RMSNorm to q and k heads; export works "
            "for models trained with model.qk_norm=true"
        )
    if m.moe.num_experts:
        if m.moe.num_shared_experts:
            problems.append(
                f"model.moe.num_shared_experts={m.moe.num_shared_experts}: Qwen3-MoE has no "
                "shared experts; export works for models with num_shared_experts=0"
            )
        if ScoreFunc(m.moe.score_func) != ScoreFunc.softmax:
            problems.append(
                f"model.moe.score_func={m.moe.score_func}: Qwen3-MoE routes with softmax scores; "
                "export works for models with score_func=softmax"
            )
    if problems:
        raise ExportError(
            "this model cannot be exported to Qwen3 / Qwen3-MoE:\n  - " + "\n  - ".join(problems)
        )


def sparse_layout(m: ModelConfig) -> tuple[int, list[int]]:
    """Qwen3-MoE's (decoder_sparse_step, mlp_only_layers) for our MoE layer pattern.

    Qwen3-MoE: layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0; ours: iff
    i >= first_k_dense and (i + 1) % moe_every_n == 0. Checked layer by layer all the same."""

    step = m.moe.moe_every_n
    only = [i for i in range(min(m.moe.first_k_dense, m.num_layers)) if (i + 1) % step == 0]
    for i in range(m.num_layers):
        theirs = i not in only and (i + 1) % step == 0
        if theirs != m.moe.is_moe_layer(i):
            raise ExportError(
                f"layer {i}: the MoE layer pattern (model.moe.first_k_dense="
                f"{m.moe.first_k_dense}, moe_every_n={step}) cannot be expressed by Qwen3-MoE's "
                "mlp_only_layers / decoder_sparse_step"
            )
    return step, only


def hf_config(m: ModelConfig, dtype: str = "bfloat16", run_cfg: Config | None = None) -> Any:
    """The transformers ``Qwen3MoeConfig`` (MoE) or ``Qwen3Config`` (dense) of config ``m``."""
    from kha_train.config import Balancing

    if m.moe.num_experts:
        from transformers import Qwen3MoeConfig as ConfigClass
    else:
        from transformers import Qwen3Config as ConfigClass
    kw: dict[str, Any] = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
        initializer_range=m.init_std,
        dtype=dtype,
        architectures=[
            "Qwen3MoeForCausalLM" if m.moe.num_experts else "Qwen3ForCausalLM",
        ],
    )
    # transformers 5 takes RoPE settings as rope_parameters; 4.x as rope_theta.
    if "rope_parameters" in inspect.signature(ConfigClass.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    else:
        kw["rope_theta"] = float(m.rope_theta)
    if m.moe.num_experts:
        step, only = sparse_layout(m)
        aux = Balancing(m.moe.balancing) == Balancing.aux_loss
        kw.update(
            moe_intermediate_size=m.moe.expert_ffn_size,
            num_experts=m.moe.num_experts,
            num_experts_per_tok=m.moe.top_k,
            norm_topk_prob=m.moe.norm_topk_prob,
            decoder_sparse_step=step,
            mlp_only_layers=only,
            # The coefficient training used; 0 when it balanced without an aux loss.
            router_aux_loss_coef=m.moe.aux_loss_coef if aux else 0.0,
        )
    if run_cfg is not None:
        kw["max_position_embeddings"] = run_cfg.data.seq_len  # the length it was trained at
        tok = _dataset_tokenizer_info(run_cfg)
        if tok.get("eos_id") is not None:
            kw["eos_token_id"] = tok["eos_id"]
        if tok.get("pad_id") is not None:
            kw["pad_token_id"] = tok["pad_id"]
    return ConfigClass(**kw)


def hf_state_dict(
    model: Transformer, dtype: torch.dtype, drop_router_bias: bool = False
) -> dict[str, torch.Tensor]:
    """``model``'s weights under Hub key names (KHA-Linear folded in; ``model`` is changed)."""
    import torch

    from kha_train.model.moe.layer import MoELayer
    from kha_train.tools.absorb import absorb_kha

    check_exportable(model.cfg)
    biased = [
        i
        for i, b in enumerate(model.layers)
        if isinstance(b.ffn, MoELayer) and bool(b.ffn.expert_bias.ne(0).any())
    ]
    if biased and not drop_router_bias:
        raise ExportError(
            f"layers {biased} have a non-zero router selection bias (loss-free balancing), which "
            "Qwen3-MoE cannot represent: the exported model would pick different experts than "
            "in training. Pass --drop-router-bias to export without it (then evaluate the "
            "exported model), or train with model.moe.balancing=aux_loss or none"
        )
    if biased:
        print(
            f"warning: dropping the non-zero router selection bias of layers {biased}: the "
            "exported model routes tokens differently than in training",
            file=sys.stderr,
        )
    absorb_kha(model)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight}
    for i, block in enumerate(model.layers):
        p, a = f"model.layers.{i}.", block.attn
        if any(getattr(a, f"kha_{t}") is not None for t in "qkv"):
            raise ExportError(f"layer {i}: a KHA module is left after folding KHA-Linear")
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            sd[p + f"self_attn.{name}.weight"] = getattr(a, name).weight
        sd[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            sd[p + "mlp.gate.weight"] = ffn.router.weight  # (E, D)
            ex = ffn.experts
            for j in range(ffn.num_experts):
                gate, up = ex.w_gate_up_E2FD[j].chunk(2, dim=0)  # (F, D) each
                sd[p + f"mlp.experts.{j}.gate_proj.weight"] = gate
                sd[p + f"mlp.experts.{j}.up_proj.weight"] = up
                sd[p + f"mlp.experts.{j}.down_proj.weight"] = ex.w_down_EDF[j]  # (D, F)
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                sd[p + f"mlp.{name}.weight"] = getattr(ffn, name).weight
    sd["model.norm.weight"] = model.norm.weight
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head.weight
    # Clones: expert slices share storage, which safetensors refuses.
    with torch.no_grad():
        return {k: v.detach().to("cpu", dtype).clone().contiguous() for k, v in sd.items()}


def export_hf(
    model: Transformer,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    drop_router_bias: bool = False,
    run_cfg: Config | None = None,
) -> list[Path]:
    """Write ``model`` (changed in place: KHA-Linear folded) as a transformers checkpoint in
    ``out`` (a new or empty folder) and return the files written. ``run_cfg``, the run config,
    adds the trained sequence length, EOS / pad ids and the dataset's tokenizer."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.bfloat16
    out = Path(out)
    _check_out(out)
    check_exportable(model.cfg)
    config = hf_config(model.cfg, str(dtype).removeprefix("torch."), run_cfg)
    sd = hf_state_dict(model, dtype, drop_router_bias)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    written = [out / "config.json", out / "model.safetensors"]
    tok = find_tokenizer(run_cfg) if run_cfg is not None else None
    if tok is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tok.parent / name).is_file():
                shutil.copyfile(tok.parent / name, out / name)
                written.append(out / name)
    return written


def find_tokenizer(run_cfg: Config) -> Path | None:
    """The tokenizer.json the run config names (data.tokenizer), else the one its dataset's
    index.json records, if that file exists; else None."""
    candidates = [run_cfg.data.tokenizer, _dataset_tokenizer_info(run_cfg).get("path")]
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        p = p / "tokenizer.json" if p.is_dir() else p
        if p.is_file() and p.name == "tokenizer.json":
            return p
    return None


def _dataset_tokenizer_info(run_cfg: Config) -> dict[str, Any]:
    """The "tokenizer" entry of the dataset's index.json ({} if there is none to read)."""
    try:
        index = json.loads((Path(run_cfg.data.dataset) / "index.json").read_text())
    except (OSError, ValueError, TypeError):
        return {}
    tok = index.get("tokenizer") if isinstance(index, dict) else None
    return tok if isinstance(tok, dict) else {}


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty folder; choose a new folder")
