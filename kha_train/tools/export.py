"""`kha-train export`: a trained model as a Hugging Face transformers checkpoint.

Every model the trainer builds is exported, to the class that holds it exactly:

- a stock class where one does: Qwen3-MoE (``Qwen3MoeForCausalLM``) for MoE models, Qwen3
  (``Qwen3ForCausalLM``) for dense ones: the same pre-norm blocks, QK-norm, half-split RoPE,
  softmax top-k router and SwiGLU experts (/work/shared/papers/NOTES.md section 3). That needs
  model.attention=gqa with qk_norm, KHA none or linear (KHA-Linear is folded into the
  projections first, absorb.py, exact), no shared experts, softmax router scores, a layer
  pattern Qwen3-MoE can express, and a zero loss-free selection bias, or --drop-router-bias
  (an explicit choice: routing then differs from training);
- otherwise ``KhaForCausalLM``, a transformers model class of ours written into the export
  (tools/hf/configuration_kha.py and modeling_kha.py, ``auto_map``; load with
  ``trust_remote_code=True``): KHA-MLP / gate, the router bias, shared experts, sigmoid scores,
  GTA, MLA, MEA and talking heads, with kha_train's own weight names.

No stock class carries the rest exactly. Ernie-4.5-MoE (transformers.models.ernie4_5_moe) has
our router (fp32 softmax, top-k on scores + ``e_score_correction_bias``, gates from the
unbiased scores, renormalised), but its attention has no QK-norm and rotates interleaved
feature pairs, so it cannot hold a Qwen3-style (QK-norm) model; it is not used.

The output folder holds config.json (built by transformers' own config class for the stock
classes, so it is what the installed version reads), model.safetensors, README.md (which class
and why), the remote-code files where used, and the dataset's tokenizer where one is found.
Torch and transformers are imported inside the functions (fast --help).
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
HF_CLASSES = ("auto", "stock", "remote")  # --hf-class: which transformers class to export to
REMOTE_CLASS = "KhaForCausalLM"
REMOTE_FILES = ("configuration_kha.py", "modeling_kha.py")
HF_CODE_DIR = Path(__file__).parent / "hf"


class ExportError(ValueError):
    """A model the asked-for class cannot represent, or a bad output folder; names the fix."""


def run_export(args: argparse.Namespace) -> int:
    import torch

    from kha_train.tools.weights_io import load_model, load_source_config

    source = Path(args.source)
    out = Path(args.out)
    _check_out(out)
    cfg = load_source_config(source, args.config)
    hf_class = args.hf_class
    drop = args.drop_router_bias
    _check_choice(stock_problems(cfg.model), hf_class, drop)  # before reading any weights
    model = load_model(cfg.model, source, "cpu")
    cls, _ = choose_class(model, hf_class, drop)
    written = export_hf(
        model,
        out,
        dtype=getattr(torch, DTYPES[args.dtype]),
        drop_router_bias=drop,
        run_cfg=cfg,
        hf_class=hf_class,
    )
    kind = {
        "Qwen3MoeForCausalLM": "Qwen3-MoE",
        "Qwen3ForCausalLM": "Qwen3",
    }.get(cls, f"{REMOTE_CLASS} (remote code: load with trust_remote_code=True)")
    print(f"exported {source} as {kind} ({args.dtype}) to {out}:")
    for path in written:
        print(f"  {path.name}")
    return 0


def stock_problems(m: ModelConfig) -> list[str]:
    """Why Qwen3 / Qwen3-MoE cannot hold a model of config ``m`` exactly ([] if they can),
    apart from the router bias, which is in the weights (:func:`biased_layers`)."""
    from kha_train.config import AttentionKind, KHAVariant, ScoreFunc

    problems = []
    if AttentionKind(m.attention) != AttentionKind.gqa:
        problems.append(f"model.attention={m.attention}: Qwen3 has only grouped-query attention")
    if KHAVariant(m.kha.variant) in (KHAVariant.mlp, KHAVariant.gate):
        problems.append(
            f"model.kha.variant={m.kha.variant}: KHA-MLP / gate is a nonlinear per-head transform "
            "that cannot be folded into the projections, and Qwen3 attention has no place for it"
        )
    if not m.qk_norm:
        problems.append("model.qk_norm=false: Qwen3 always applies RMSNorm to q and k heads")
    if m.moe.num_experts:
        if m.moe.num_shared_experts:
            problems.append(
                f"model.moe.num_shared_experts={m.moe.num_shared_experts}: Qwen3-MoE has no "
                "shared experts"
            )
        if ScoreFunc(m.moe.score_func) != ScoreFunc.softmax:
            problems.append(
                f"model.moe.score_func={m.moe.score_func}: Qwen3-MoE routes with softmax scores"
            )
        try:
            sparse_layout(m)
        except ExportError as e:
            problems.append(str(e))
    return problems


def check_exportable(m: ModelConfig) -> None:
    """Raise :class:`ExportError` if a model of config ``m`` has no exact Qwen3(-MoE) class
    (it is then exported with the remote-code class; see :func:`choose_class`)."""
    problems = stock_problems(m)
    if problems:
        raise ExportError(
            "this model cannot be exported to Qwen3 / Qwen3-MoE:\n  - " + "\n  - ".join(problems)
        )


def biased_layers(model: Transformer) -> list[int]:
    """The layers whose loss-free balancing bias (router selection bias) is non-zero."""
    from kha_train.model.moe.layer import MoELayer

    return [
        i
        for i, b in enumerate(model.layers)
        if isinstance(b.ffn, MoELayer) and bool(b.ffn.expert_bias.ne(0).any())
    ]


def _bias_reason(biased: list[int]) -> str:
    return (
        f"layers {biased} have a non-zero router selection bias (loss-free balancing), which "
        "Qwen3-MoE's router has no place for: it would pick different experts than in training"
    )


def _check_choice(problems: list[str], hf_class: str, drop_router_bias: bool) -> None:
    if hf_class not in HF_CLASSES:
        raise ExportError(f"--hf-class {hf_class}: use one of {', '.join(HF_CLASSES)}")
    if hf_class == "remote" and drop_router_bias:
        raise ExportError(
            "--drop-router-bias applies only to the stock Qwen3-MoE class; the remote-code class "
            "keeps the bias: drop one of the two flags"
        )
    if problems and (hf_class == "stock" or drop_router_bias):
        flag = "--hf-class stock" if hf_class == "stock" else "--drop-router-bias"
        raise ExportError(
            f"{flag} asks for the stock Qwen3 / Qwen3-MoE class, which cannot hold this model:"
            "\n  - " + "\n  - ".join(problems) + "\nexport without it: the model is then "
            f"written as {REMOTE_CLASS} (remote code), which holds it exactly"
        )


def choose_class(
    model: Transformer, hf_class: str = "auto", drop_router_bias: bool = False
) -> tuple[str, str]:
    """(transformers class name, why) for exporting ``model``: the stock Qwen3(-MoE) class
    where it is exact (or the router bias is dropped on request), else the remote-code class.
    ``hf_class`` "stock" or "remote" forces one (stock: an error where it is not exact)."""
    m = model.cfg
    problems = stock_problems(m)
    _check_choice(problems, hf_class, drop_router_bias)
    biased = biased_layers(model) if m.moe.num_experts else []
    stock = "Qwen3MoeForCausalLM" if m.moe.num_experts else "Qwen3ForCausalLM"
    if hf_class == "remote":
        return REMOTE_CLASS, "asked for with --hf-class remote (a stock class would also be exact)"
    if biased and not drop_router_bias:
        if hf_class == "stock":
            raise ExportError(
                _bias_reason(biased) + ". Pass --drop-router-bias to export to the stock class "
                "without it (then evaluate the exported model), or export without "
                f"--hf-class stock to keep it ({REMOTE_CLASS}, remote code)"
            )
        problems = [*problems, _bias_reason(biased)]
    if problems:
        return REMOTE_CLASS, (
            "no stock transformers class holds this model exactly:\n"
            + "".join(f"- {p}\n" for p in problems)
            + "(Ernie-4.5-MoE has this router bias but no QK-norm and interleaved RoPE.)"
        )
    why = (
        "the stock class computes exactly what this model computes (gqa attention with "
        "QK-norm, KHA-Linear folded into the projections where present"
        + (", softmax top-k router" if m.moe.num_experts else "")
        + ")"
    )
    if biased:
        why += (
            f"; the non-zero router selection bias of layers {biased} was DROPPED on request "
            "(--drop-router-bias): routing differs from training"
        )
    return stock, why


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
    kw = _common_hf_fields(m, dtype, run_cfg)
    kw.update(
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
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
    return ConfigClass(**kw)


def _common_hf_fields(m: ModelConfig, dtype: str, run_cfg: Config | None) -> dict[str, Any]:
    """The transformers config fields every exported class shares: sizes, norm, init, tying,
    dtype, and from the run (if given) the trained length and the tokenizer's EOS / pad ids."""
    kw: dict[str, Any] = dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        rms_norm_eps=m.norm_eps,
        initializer_range=m.init_std,
        tie_word_embeddings=m.tie_embeddings,
        dtype=dtype,
    )
    if run_cfg is not None:
        kw["max_position_embeddings"] = run_cfg.data.seq_len  # the length it was trained at
        tok = _dataset_tokenizer_info(run_cfg)
        if tok.get("eos_id") is not None:
            kw["eos_token_id"] = tok["eos_id"]
        if tok.get("pad_id") is not None:
            kw["pad_token_id"] = tok["pad_id"]
    return kw


def hf_state_dict(
    model: Transformer, dtype: torch.dtype, drop_router_bias: bool = False
) -> dict[str, torch.Tensor]:
    """``model``'s weights under Hub key names (KHA-Linear folded in; ``model`` is changed)."""
    import torch

    from kha_train.model.moe.layer import MoELayer
    from kha_train.tools.absorb import absorb_kha

    check_exportable(model.cfg)
    biased = biased_layers(model) if model.cfg.moe.num_experts else []
    if biased and not drop_router_bias:
        raise ExportError(_bias_reason(biased) + ". Pass --drop-router-bias to drop it")
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
    hf_class: str = "auto",
) -> list[Path]:
    """Write ``model`` as a transformers checkpoint in ``out`` (a new or empty folder) and
    return the files written: the stock class where exact, else the remote-code class
    (:func:`choose_class`). For the stock class ``model`` is changed in place (KHA-Linear
    folded). ``run_cfg``, the run config, adds the trained sequence length, EOS / pad ids and
    the dataset's tokenizer."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.bfloat16
    out = Path(out)
    _check_out(out)
    cls, why = choose_class(model, hf_class, drop_router_bias)
    dtype_name = str(dtype).removeprefix("torch.")
    if cls == REMOTE_CLASS:
        config = remote_config(model.cfg, dtype_name, run_cfg)
        sd = remote_state_dict(model, dtype)
    else:
        config = hf_config(model.cfg, dtype_name, run_cfg)
        sd = hf_state_dict(model, dtype, drop_router_bias)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    written = [out / "config.json", out / "model.safetensors"]
    if cls == REMOTE_CLASS:
        for name in REMOTE_FILES:
            shutil.copyfile(HF_CODE_DIR / name, out / name)
            written.append(out / name)
    (out / "README.md").write_text(_readme(model.cfg, cls, why, dtype_name))
    written.append(out / "README.md")
    tok = find_tokenizer(run_cfg) if run_cfg is not None else None
    if tok is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tok.parent / name).is_file():
                shutil.copyfile(tok.parent / name, out / name)
                written.append(out / name)
    return written


def remote_config(m: ModelConfig, dtype: str = "bfloat16", run_cfg: Config | None = None) -> Any:
    """The ``KhaConfig`` (tools/hf/configuration_kha.py) of config ``m``, with ``auto_map``."""
    from dataclasses import asdict

    from kha_train.tools.hf.configuration_kha import KhaConfig

    def plain(x: Any) -> Any:  # enums (str subclasses) as plain strings
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list):
            return [plain(v) for v in x]
        return x.value if hasattr(x, "value") else x

    kw = _common_hf_fields(m, dtype, run_cfg)
    kw.update(
        rope_theta=float(m.rope_theta),
        qk_norm=m.qk_norm,
        attention=plain(m.attention),
        kha=plain(asdict(m.kha)),
        moe=plain(asdict(m.moe)),
        mla=plain(asdict(m.mla)),
        mea=plain(asdict(m.mea)),
        architectures=[REMOTE_CLASS],
        auto_map={
            "AutoConfig": "configuration_kha.KhaConfig",
            "AutoModel": "modeling_kha.KhaModel",
            "AutoModelForCausalLM": f"modeling_kha.{REMOTE_CLASS}",
        },
    )
    return KhaConfig(**kw)


def remote_state_dict(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``model``'s state dict under the remote-code class's names (``model.`` + ours; the untied
    head as ``lm_head.weight``), in ``dtype``; the router selection bias stays fp32."""
    import torch

    sd = {}
    with torch.no_grad():
        for k, v in model.state_dict().items():
            name = k if k.startswith("lm_head.") else "model." + k
            keep = k.endswith("expert_bias")
            sd[name] = v.detach().to("cpu", torch.float32 if keep else dtype).clone().contiguous()
    return sd


def _readme(m: ModelConfig, cls: str, why: str, dtype: str) -> str:
    remote = cls == REMOTE_CLASS
    load = (
        "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)"
        if remote
        else "AutoModelForCausalLM.from_pretrained(DIR)"
    )
    kha = (
        f"{m.kha.variant} on {', '.join(m.kha.targets)}" if str(m.kha.variant) != "none" else "none"
    )
    moe = (
        f"{m.moe.num_experts} experts top-{m.moe.top_k}, {m.moe.num_shared_experts} shared, "
        f"score {m.moe.score_func}, balancing {m.moe.balancing}"
        if m.moe.num_experts
        else "dense"
    )
    lines = [
        "# kha_train export",
        "",
        f"Class: `{cls}`"
        + (" (remote code in this folder)." if remote else " (stock transformers)."),
        "",
        f"Load: `{load}` (weights in {dtype}).",
        "",
        "Why this class: " + why,
        "",
        f"Model: {m.num_layers} layers, hidden {m.hidden_size}, attention {m.attention} "
        f"({m.num_heads} query / {m.num_kv_heads} KV heads x {m.head_dim}), KHA {kha}, {moe}, "
        f"{'tied' if m.tie_embeddings else 'untied'} head.",
        "",
    ]
    if remote:
        lines += [
            "`configuration_kha.py` and `modeling_kha.py` import only torch and transformers "
            "(kha_train is not needed). Weight names are kha_train's own, prefixed `model.`. "
            "Generation uses transformers' DynamicCache.",
            "",
        ]
    return "\n".join(lines)


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
