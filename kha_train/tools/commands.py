"""Commands on a config or a trained model (argparse only: the handlers import their module when
they run, so `kha-train --help` stays instant):

- `kha-train info CONFIG [key=value ...]`: sizes, FLOPs, KHA overhead, KV cache and memory of a
  config, computed without allocating the model (info.py);
- `kha-train virtual-heads SOURCE --kv-heads N [key=value ...]`: MEA's virtual heads, the KV
  heads of a trained GQA / MEA model factored into fewer cached heads, with the held-out loss
  before and after (virtual_heads.py);
- `kha-train export SOURCE --out DIR`: a trained model as a Hugging Face checkpoint (export.py);
- `kha-train eval RUN_OR_CHECKPOINT`: loss, perplexity and bits per byte (evaluate.py);
- `kha-train generate RUN_OR_CHECKPOINT --prompt TEXT`: sampling with a KV cache (generate.py);
- `kha-train replay RUN_DIR --step N`: the steps around a spike re-run from the checkpoint
  before it: does it recur? (replay.py);
- `kha-train lm-eval LM_EVAL_ARGS`: lm-evaluation-harness with `--model kha-train`
  (lm_eval_model.py);
- `kha-train spikes RUN_DIR`: every loss spike of a run, what was done about it, and the decoded
  samples of the highest loss in the worst ones (spikes_report.py).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from kha_train.tools import evaluate
from kha_train.tools.args import (
    CHECKPOINT_SOURCE_HELP,
    add_device_argument,
    add_source_arguments,
)
from kha_train.tools.replay import add_replay_arguments


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
    add_source_arguments(v, help=CHECKPOINT_SOURCE_HELP)
    v.add_argument("--kv-heads", type=int, required=True, help="KV heads to cache per layer")
    v.add_argument(
        "--batches", type=int, default=8, help="held-out micro-batches to evaluate (default 8)"
    )
    v.add_argument("--out", help="write the converted weights here (.safetensors) + a .yaml")
    add_device_argument(v)
    v.set_defaults(func=_run("kha_train.tools.virtual_heads", "run_virtual_heads"))

    p = subparsers.add_parser(
        "export",
        help="export a trained model to Hugging Face transformers",
        description=(
            "Write a trained model as a Hugging Face transformers checkpoint (config.json, "
            "model.safetensors, README.md, and the dataset's tokenizer.json when the config "
            "names one that exists): the stock Qwen3-MoE / Qwen3 class where it holds the model "
            "exactly (KHA-Linear folded into the projections), else KhaForCausalLM, remote code "
            "written into the folder (load with trust_remote_code=True), which keeps KHA-MLP / "
            "gate, the router bias, shared experts, sigmoid scores and every attention variant."
        ),
    )
    add_source_arguments(p, help=CHECKPOINT_SOURCE_HELP, overrides=False)
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument(
        "--hf-class",
        choices=["auto", "stock", "remote"],
        default="auto",
        help="auto: the stock Qwen3(-MoE) class where exact, else the remote-code class "
        "(default); stock: refuse where the stock class is not exact; remote: always the "
        "remote-code class",
    )
    p.add_argument(
        "--drop-router-bias",
        action="store_true",
        help="export to the stock Qwen3-MoE class without the router's non-zero loss-free "
        "selection bias (an explicit choice: routing then differs from training; without this "
        "flag such a model keeps its bias in the remote-code class)",
    )
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="weights dtype (default bf16)"
    )
    p.set_defaults(func=_run("kha_train.tools.export", "run_export"))

    e = subparsers.add_parser(
        "eval",
        help="held-out loss, perplexity and bits per byte of a trained model",
        description=(
            "Score a run (its newest checkpoint), a checkpoint folder or a weights file on the "
            "run's val split, prepared datasets (--data) and raw text (--source): loss, "
            "perplexity and bits per byte per source and overall. Each document is scored "
            "alone; documents longer than the window are scored by a sliding window "
            "(docs/evaluation.md)."
        ),
    )
    evaluate.add_eval_arguments(e)  # the module imports only the standard library at the top
    e.set_defaults(func=_run("kha_train.tools.evaluate", "run_eval"))

    g = subparsers.add_parser(
        "generate",
        help="sample text from a trained model (KV-cached, streamed)",
        description=(
            "Generate text from a run (its newest checkpoint), a checkpoint folder or a weights "
            "file: one prompt streamed to the terminal, or a file of prompts in one batch; "
            "greedy (--temperature 0) or temperature / top-k / top-p sampling with a seed, "
            "stopping at EOS. Every attention variant decodes with a KV cache."
        ),
    )
    add_generate_arguments(g)
    g.set_defaults(func=_run("kha_train.tools.generate", "run_generate"))

    r = subparsers.add_parser(
        "replay",
        help="re-run the steps around a loss spike from the checkpoint before it",
        description=(
            "Restore the run's newest checkpoint before --step, train to --step + --after with "
            "the run's config into RUN_DIR/replay/step_XXXXXXX, and compare with the run: does "
            "the spike recur (its data causes it) or not (a transient)? Bitwise with "
            "train.deterministic=true. See docs/training.md."
        ),
    )
    add_replay_arguments(r)
    r.set_defaults(func=_run("kha_train.tools.replay", "run_replay"))

    lm = subparsers.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with --model kha-train (needs the eval extra)",
        description=(
            "lm-evaluation-harness's own command line (every lm_eval argument) with the "
            "kha-train model class registered: `kha-train lm-eval run --model kha-train "
            "--model_args path=RUN --tasks hellaswag`. Released lm-eval (through 0.5.0.dev1) "
            "has no plugin discovery, so the plain `lm_eval` command cannot find outside models "
            "(docs/evaluation.md, lm-eval). lm-eval's own help: `kha-train lm-eval run --help`."
        ),
    )
    # Listed here for --help; cli.main hands everything after `lm-eval` to lm-eval unparsed.
    lm.add_argument("args", nargs="*", help="lm_eval's arguments")

    sp = subparsers.add_parser(
        "spikes",
        help="every loss spike of a run, what was done, and its worst samples decoded",
        description=(
            "Read RUN_DIR/metrics.jsonl and print every loss or grad-norm spike (step, what "
            "spiked, loss, grad norm, z-scores, action: logged, skipped, guard reset or rolled "
            "back), then for the worst explained spikes the samples of the highest loss in "
            "their batch, decoded (scored when the spike was seen: logging.spikes.explain_*). "
            "With several runs (e.g. a study's variants and seeds, which share their data "
            "order): one row per spike step, in how many runs it spiked and whether on the same "
            "batch (then it is the data's). No model or GPU is needed."
        ),
    )
    sp.add_argument(
        "run_dir", nargs="+",
        help="run directories (logging.run_dir), their metrics.jsonl, or study archives",
    )  # fmt: skip
    sp.add_argument(
        "--top", type=int, default=5, help="spike steps whose samples are printed (default 5)"
    )
    sp.add_argument(
        "--json", metavar="OUT", help="also write the report as JSON to OUT (-: stdout, alone)"
    )
    sp.set_defaults(func=_run("kha_train.tools.spikes_report", "run_spikes"))


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue (streamed as it is decoded)")
    prompt.add_argument("--prompts-file", help="a text file, one prompt per line, run as a batch")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the run's, see above)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (128)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0: greedy (0.8)"
    )
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely (0: off)")
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus: smallest set of mass p (1: off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    parser.add_argument(
        "--ignore-eos", action="store_true", help="do not stop at EOS: always max-new-tokens"
    )
    add_device_argument(parser)
    parser.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="compute dtype: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on CPU)",
    )
