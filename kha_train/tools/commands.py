"""Commands on a config or a trained model (argparse only: the handlers import their module when
they run, so `kha-train --help` stays instant):

- `kha-train info CONFIG [key=value ...]`: sizes, FLOPs, KHA overhead, KV cache and memory of a
  config, computed without allocating the model (info.py);
- `kha-train virtual-heads SOURCE --kv-heads N [key=value ...]`: MEA's virtual heads, the KV
  heads of a trained GQA / MEA model factored into fewer cached heads, with the held-out loss
  before and after (virtual_heads.py);
- `kha-train export SOURCE --out DIR`: a trained model as a Hugging Face checkpoint (export.py).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

# The weights a model tool reads (tools/weights_io.py).
SOURCE_HELP = (
    "a trainer checkpoint folder (checkpoints/step_XXXXXXX, config read from its config.yaml), "
    "or a .safetensors / .pt state-dict file (then give --config)"
)


def _run(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The handler ``module.name``, imported when the command runs."""

    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return handler


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="parameters, FLOPs/token, KHA overhead, KV cache and memory of a config",
        description=(
            "Print the model size (total and active parameters), training FLOPs per token "
            "(torchtitan MFU convention), the KHA overhead against the same config with "
            "model.kha.variant=none, KV-cache bytes per token and a rough per-rank training "
            "memory estimate. Nothing is allocated: the model is built on the meta device."
        ),
    )
    p.add_argument("config", help="run config YAML (e.g. configs/paper/main/kha.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.num_layers=24")
    p.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="data-parallel ranks for the memory estimate (default: the smallest count the "
        "global batch allows with this micro-batch, capped at 8)",
    )
    p.set_defaults(func=_run("kha_train.tools.info", "run_info"))

    v = subparsers.add_parser(
        "virtual-heads",
        help="factor a trained GQA/MEA model's KV heads into fewer cached heads (MEA)",
        description=(
            "MEA's virtual heads (Peng et al. 2026, appendix F): factor each layer's K and V "
            "projections by SVD over the head axis into --kv-heads cached heads, expanded back "
            "by MEA's head-level linear composition at attention time. The KV cache shrinks by "
            "num_kv_heads / --kv-heads. Prints the held-out loss (the dataset's val split) "
            "before and after, and with --out writes the converted weights (safetensors) and "
            "their config (same name, .yaml)."
        ),
    )
    v.add_argument("source", help=SOURCE_HELP)
    v.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides right after SOURCE, e.g. data.dataset=DIR train.micro_batch_size=1",
    )
    v.add_argument("--kv-heads", type=int, required=True, help="KV heads to cache per layer")
    v.add_argument("--config", help="run config YAML of the weights (required for files)")
    v.add_argument(
        "--batches", type=int, default=8, help="held-out micro-batches to evaluate (default 8)"
    )
    v.add_argument("--out", help="write the converted weights here (.safetensors) + a .yaml")
    v.add_argument("--device", default="auto", help="auto (cuda if available) | cuda | cpu")
    v.set_defaults(func=_run("kha_train.tools.virtual_heads", "run_virtual_heads"))

    p = subparsers.add_parser(
        "export",
        help="export a trained model to Hugging Face transformers (Qwen3-MoE / Qwen3)",
        description=(
            "Write a trained model as a Hugging Face transformers checkpoint: Qwen3-MoE for MoE "
            "models, Qwen3 for dense ones (config.json, model.safetensors, and the dataset's "
            "tokenizer.json when the config names one that exists). KHA-Linear is folded into "
            "the attention projections (exact). KHA-MLP / gate, attention other than gqa, "
            "shared experts and sigmoid router scores have no Qwen3 equivalent and are refused."
        ),
    )
    p.add_argument("source", help=SOURCE_HELP)
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--config", help="run config YAML of the weights (required for files)")
    p.add_argument(
        "--drop-router-bias",
        action="store_true",
        help="export even though the router's loss-free selection bias is non-zero (Qwen3-MoE "
        "has none): the exported model then routes tokens differently than in training",
    )
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="weights dtype (default bf16)"
    )
    p.set_defaults(func=_run("kha_train.tools.export", "run_export"))
