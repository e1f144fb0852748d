"""`--model kha-train`: lm-evaluation-harness scores kha-train checkpoints as they are.

    pip install 'kha-train[eval]'
    python -m kha_train.tools.lm_eval_model --model kha-train \\
        --model_args path=runs/kha-moe,dtype=bf16 --tasks hellaswag --device cuda

The model is read where ``kha-train eval`` reads it (a run directory, a ``step_XXXXXXX`` folder,
or a weights file with ``config=RUN.yaml``); nothing is converted. The tokenizer is
``tokenizer=`` else the run's (``data.tokenizer``, else the dataset's ``tokenizer.json``).

The three request types lm-eval sends:

- ``loglikelihood(context, continuation)``: context and continuation are encoded together and
  split as lm-eval's own ``hf`` backend splits them (``TemplateLM._encode_pair``), so both
  backends score the same tokens; an empty context is the EOS token, the document boundary
  the model saw in packed training (there is no BOS). Inputs longer than ``max_length`` keep
  their last ``max_length`` tokens. Requests share batched forwards, padded on the right
  (attention is causal and MoE routing per token, so padding changes nothing before it);
  log-probabilities are taken in fp32 from the logits.
- ``loglikelihood_rolling(text)``: the text after an EOS, read in lm-eval's disjoint windows
  of ``max_length`` tokens (``lm_eval.utils.get_rolling_token_windows``), each token scored
  once.
- ``generate_until(context, gen_kwargs)``: decoding over the KV cache of tools/generate.py,
  greedy unless ``do_sample`` is set, until EOS, a stop string (``until``) or ``max_gen_toks``.

Registration. lm-eval 0.4.13, the newest release, finds models only in its own registry, so
importing this module registers ``kha-train`` there (``python -m kha_train.tools.lm_eval_model``
does that, then runs lm-eval's command line with the same arguments). pyproject.toml also
declares the ``lm_eval.models`` entry point that lm-eval's plugin discovery (upstream PR
#4013, after 0.4.13) reads, so with such a release the plain ``lm_eval --model kha-train``
works. docs/evaluation.md ("lm-eval") has the model_args and what was compared.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the one hint a user without the extra needs
    raise ImportError(
        "kha_train.tools.lm_eval_model needs lm-evaluation-harness: pip install 'kha-train[eval]'"
    ) from e

from kha_train.config import AttnBackend, ConfigError

if TYPE_CHECKING:
    import torch
    from lm_eval.api.instance import Instance

    from kha_train.config import Config
    from kha_train.data.tokenizer import LoadedTokenizer
    from kha_train.tools.generate import Sampling

log = logging.getLogger(__name__)

MODEL_NAME = "kha-train"
TARGET = "kha_train.tools.lm_eval_model:KhaTrainLM"  # where the registry finds the class
DTYPES = {"auto": None, "fp32": False, "float32": False, "bf16": True, "bfloat16": True}
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say
# Padded tokens per forward when batch_size=auto (the `kha-train eval --batch-tokens` default).
AUTO_BATCH_TOKENS = 16384
# What generate_until reads from a task's generation_kwargs; other keys are backend options
# of other models (e.g. transformers' num_beams) and are ignored with a warning.
GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k",
            "top_p"}  # fmt: skip

# A scored request: ((context, continuation) or None for a rolling window, context ids,
# continuation ids), the form lm-eval's TemplateLM hands to _loglikelihood_tokens.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


class KhaTrainLM(TemplateLM):
    """An lm-eval model over a kha-train checkpoint, on one device (see the module docstring).

    ``--model_args`` (:func:`check_model_args`): ``path`` (run directory, checkpoint folder or
    weights file), ``config`` (the run config of a weights file), ``tokenizer``, ``dtype``
    (auto | fp32 | bf16: the forward's precision; auto is bf16 autocast on CUDA, fp32
    elsewhere), ``max_length`` (default the training ``data.seq_len``), ``max_gen_toks`` (for
    tasks that do not set it) and ``batch_tokens`` (the padded tokens per forward of
    ``--batch_size auto``). ``device``, ``batch_size`` (requests per forward, or auto) and
    ``max_batch_size`` come from lm-eval's own flags.
    """

    def __init__(
        self,
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        **model_args: Any,
    ) -> None:
        super().__init__()
        from kha_train.tools.weights_io import load_model

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "the kha-train lm-eval model runs in one process: run lm-eval without "
                "accelerate / torchrun"
            )
        args = check_model_args(**model_args)
        self._rows, self._max_rows = _batching(batch_size, max_batch_size)
        self.ckpt, self.cfg, self.tok = args.ckpt, args.cfg, args.tok
        self._max_length, self._max_gen_toks = args.max_length, args.max_gen_toks
        self._batch_tokens = args.batch_tokens
        self._device = _device(device)
        self.bf16 = args.bf16 if args.bf16 is not None else self._device.type == "cuda"
        if self._device.type != "cuda" and self.cfg.model.attn_backend not in ("auto", "math"):
            log.warning("model.attn_backend=%s needs CUDA; using auto", self.cfg.model.attn_backend)
            self.cfg.model.attn_backend = AttnBackend.auto
        self.model = load_model(self.cfg.model, self.ckpt, self._device).eval()
        log.info("kha-train model %s on %s (%s)", self.ckpt, self._device,
                 "bf16" if self.bf16 else "fp32")  # fmt: skip

    # -- what lm-eval asks of a model ---------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eos_id  # no BOS: a document starts after EOS, as in packed training

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int | str:
        return self._rows or "auto"

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tok.path

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **_: Any
    ) -> list[int]:
        """Token ids as `data prepare` encodes text: no special tokens are ever added."""
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval writes into its results' config."""
        from kha_train.training.checkpoint_checks import STEP_DIR

        step = STEP_DIR.match(self.ckpt.name) if self.ckpt.is_dir() else None
        return {
            "kha_train_checkpoint": str(self.ckpt),
            "kha_train_step": int(step.group(1)) if step else None,
            "kha_train_run": self.cfg.name,
            "kha_train_tokenizer": self.tok.path,
            "precision": "bf16" if self.bf16 else "fp32",
        }

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **_: Any
    ) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per request."""
        inputs = []
        for _key, ctx, cont in requests:
            if not cont:
                raise ConfigError("lm-eval sent an empty continuation to score")
            if len(cont) > self.max_length:
                raise ConfigError(
                    f"a continuation of {len(cont)} tokens does not fit max_length="
                    f"{self.max_length}: raise max_length in --model_args"
                )
            # The model reads every token but the last; the first one has a prefix (an empty
            # context was already replaced by EOS), so every continuation token is predicted.
            inputs.append((ctx + cont)[-(self.max_length + 1) :])
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        for batch in self._batches(order, lambda i: len(inputs[i])):
            scores = self._score([inputs[i] for i in batch], [len(requests[i][2]) for i in batch])
            for i, score in zip(batch, scores):
                out[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-probability of each text after an EOS, in disjoint windows of max_length."""
        owner, windows = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                owner.append(i)
                windows.append((None, ctx, cont))
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each context, cut before the first stop string."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with equal gen_kwargs decode together
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for idx in groups.values():
            for i, text in self._generate_group(requests, idx):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

    # -- the work -----------------------------------------------------------------------------

    def _generate_group(
        self, requests: list[Instance], idx: list[int]
    ) -> Iterator[tuple[int, str]]:
        """(request index, text) for requests ``idx``, which share their gen_kwargs."""
        settings = self._gen_settings(requests[idx[0]].args[1])
        prompts = {i: self._prompt(requests[i].args[0], settings.max_new) for i in idx}
        order = sorted(idx, key=lambda i: -len(prompts[i]))
        for batch in self._batches(order, lambda i: len(prompts[i]) + settings.max_new):
            yield from zip(batch, self._generate([prompts[i] for i in batch], settings))

    def _batches(self, order: list[int], length: Callable[[int], int]) -> Iterator[list[int]]:
        """``order`` (longest first) cut into batches: batch_size rows, or for auto as many as
        fit the padded-token budget at the length of the batch's first (longest) row."""
        start = 0
        while start < len(order):
            rows = self._rows or max(1, self._batch_tokens // length(order[start]))
            rows = min(rows, self._max_rows or rows)
            yield order[start : start + rows]
            start += rows

    def autocast(self) -> AbstractContextManager[Any]:
        import torch

        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _score(self, seqs: list[list[int]], n_cont: list[int]) -> list[tuple[float, bool]]:
        """One forward over ``seqs`` (each: input + last target), right-padded; the sum of the
        log-probabilities of each one's last ``n_cont`` tokens and whether each was the argmax."""
        import torch

        T = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(seqs), T, dtype=torch.long)  # pads: after every real token
        for r, s in enumerate(seqs):
            ids[r, : len(s) - 1] = torch.tensor(s[:-1])
        with torch.no_grad(), self.autocast():
            logits = self.model(ids.to(self.device))  # (B, T, V)
        out = []
        for r, (s, n) in enumerate(zip(seqs, n_cont)):
            # Position p predicts token p + 1: the last n targets come from positions [len-n-1, len-1).
            rows = logits[r, len(s) - n - 1 : len(s) - 1].float().log_softmax(-1)  # (n, V)
            target = torch.tensor(s[-n:], device=rows.device)
            logprob = rows.gather(-1, target[:, None]).sum().item()
            out.append((logprob, bool((rows.argmax(-1) == target).all())))
        return out

    def _gen_settings(self, kwargs: dict[str, Any]) -> _GenSettings:
        from kha_train.tools.generate import Sampling

        unknown = sorted(set(kwargs) - GEN_KEYS)
        if unknown:
            log.warning("kha-train ignores the generation_kwargs %s", unknown)
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks))
        max_new = _positive("max_gen_toks", int(max_new), 1)
        if max_new >= self.max_length:
            raise ConfigError(
                f"max_gen_toks={max_new} leaves no room for a prompt within max_length="
                f"{self.max_length}: lower max_gen_toks (--gen_kwargs) or raise max_length"
            )
        temperature = float(kwargs.get("temperature") or 0.0)
        greedy = not kwargs.get("do_sample", False) or temperature <= 0
        sampling = Sampling(
            temperature=0.0 if greedy else temperature,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
        )
        return _GenSettings([s for s in until if s], max_new, sampling)

    def _prompt(self, context: str, max_new: int) -> list[int]:
        # An empty context starts a document: the EOS before every document in training.
        ids = self.tok_encode(context) or [self.tok.eos_id]
        return ids[-(self.max_length - max_new) :]  # left-truncated, as lm-eval's hf does

    def _generate(self, prompts: list[list[int]], s: _GenSettings) -> list[str]:
        """Decode a batch (tools/generate.py: left-padded prefill, then the KV cache) until
        every sequence has hit EOS or a stop string, or max_new tokens."""
        from kha_train.tools.generate import generate

        # A sequence is finished once its text holds a stop string, or when it stopped growing
        # (generate() ends a sequence at EOS; every other one gains a token per step).
        finished, lengths = [False] * len(prompts), [0] * len(prompts)

        def stop_when_all_finished(out: list[list[int]]) -> None:
            for b, tokens in enumerate(out):
                if not finished[b]:
                    text = self.tok_decode(tokens)
                    grew = len(tokens) > lengths[b]
                    finished[b] = not grew or any(stop in text for stop in s.until)
                lengths[b] = len(tokens)
            if all(finished):
                raise _AllStopped(out)

        try:
            with self.autocast():
                new = generate(self.model, prompts, s.max_new, s.sampling,
                               eos_id=self.tok.eos_id, on_step=stop_when_all_finished)  # fmt: skip
        except _AllStopped as done:
            new = done.tokens
        return [_cut(self.tok_decode(tokens), s.until) for tokens in new]


@dataclass(frozen=True)
class _GenSettings:
    until: list[str]  # stop strings
    max_new: int  # max_gen_toks
    sampling: Sampling


class _AllStopped(Exception):
    """Raised from generate()'s per-step callback once every sequence has a stop string: the
    tokens so far are final (the rest would be cut off anyway)."""

    def __init__(self, tokens: list[list[int]]) -> None:
        super().__init__()
        self.tokens = tokens


def _cut(text: str, until: list[str]) -> str:
    """``text`` cut before each stop string in turn, as lm-eval's own backends cut it."""
    for stop in until:
        text = text.split(stop)[0]
    return text


# -- model_args ------------------------------------------------------------------------------

LM_EVAL_ARGS = {"batch_size": "--batch_size", "max_batch_size": "--max_batch_size",
                "device": "--device"}  # fmt: skip


@dataclass(frozen=True)
class ModelArgs:
    """--model_args, checked: the weights, run config and tokenizer they name, and settings."""

    ckpt: Path  # the checkpoint folder or weights file
    cfg: Config
    tok: LoadedTokenizer
    max_length: int
    max_gen_toks: int
    batch_tokens: int
    bf16: bool | None  # None: auto (bf16 on CUDA)


def check_model_args(
    path: str | None = None,
    config: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "auto",
    max_length: int | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    batch_tokens: int = AUTO_BATCH_TOKENS,
    **unknown: Any,
) -> ModelArgs:
    """Check ``--model_args`` without loading the model; raises :class:`ConfigError` naming the
    fix (the class docstring lists them)."""
    if unknown:
        moved = [
            f"{k} (give lm-eval's {LM_EVAL_ARGS[k]})" for k in sorted(unknown) if k in LM_EVAL_ARGS
        ]
        other = sorted(set(unknown) - set(LM_EVAL_ARGS))
        hint = " (kha-train reads its checkpoint from path=)" if "pretrained" in unknown else ""
        raise ConfigError(
            f"--model_args of kha-train do not take {', '.join(moved + other)}{hint}; they "
            "take path, config, tokenizer, dtype, max_length, max_gen_toks, batch_tokens"
        )
    if not path:
        raise ConfigError(
            "kha-train needs the model's path: --model_args path=RUN_DIR (or a step_XXXXXXX "
            "folder, or path=WEIGHTS.safetensors,config=RUN.yaml)"
        )
    if str(dtype) not in DTYPES:
        raise ConfigError(f"dtype={dtype}: use auto, fp32 or bf16 (the forward's precision)")
    ckpt, cfg = _resolve(Path(str(path)), config)
    return ModelArgs(
        ckpt=ckpt,
        cfg=cfg,
        tok=_tokenizer(cfg, tokenizer),
        max_length=_positive(
            "max_length", cfg.data.seq_len if max_length is None else max_length, 2
        ),
        max_gen_toks=_positive("max_gen_toks", max_gen_toks, 1),
        batch_tokens=_positive("batch_tokens", batch_tokens, 1),
        bf16=DTYPES[str(dtype)],
    )


def _resolve(path: Path, config: str | None) -> tuple[Path, Config]:
    """The checkpoint ``path`` names (evaluate.resolve_checkpoint) and its run config."""
    from kha_train.tools.evaluate import resolve_checkpoint
    from kha_train.tools.weights_io import load_source_config

    if not path.exists():
        raise ConfigError(
            f"path={path}: no such run directory, checkpoint folder or weights file; give a run "
            "directory, a step_XXXXXXX folder, or a .safetensors / .pt file with config=RUN.yaml"
        )
    try:
        ckpt = resolve_checkpoint(path)
    except ConfigError:  # its fix names kha-train eval's flags; say it in model_args
        raise ConfigError(
            f"path={path} is a folder without a complete checkpoint (no .metadata in it, none in "
            "its checkpoints/ or checkpoint.dir): give a run directory whose training saved a "
            "checkpoint, a step_XXXXXXX folder, or path=WEIGHTS.safetensors,config=RUN.yaml"
        ) from None
    if ckpt.is_file() and not config:
        raise ConfigError(
            f"path={path} is a weights file: add its run config, --model_args "
            f"path={path},config=RUN.yaml"
        )
    if config and not Path(config).is_file():
        raise ConfigError(f"config={config}: no such file; give the run's config.yaml")
    return ckpt, load_source_config(ckpt, config)


def _tokenizer(cfg: Config, explicit: str | None) -> LoadedTokenizer:
    """tokenizer=, else the run's (tools/generate.py), checked against the model's vocabulary."""
    from kha_train.data.errors import DataError
    from kha_train.data.tokenizer import load_tokenizer
    from kha_train.tools.generate import find_generation_tokenizer

    if explicit and not Path(explicit).exists():
        raise ConfigError(f"tokenizer={explicit}: no such file or folder")
    try:
        found = find_generation_tokenizer(cfg, explicit)
    except DataError:
        raise ConfigError(
            f"no tokenizer found for this run (data.tokenizer is unset and data.dataset="
            f"{cfg.data.dataset} holds no tokenizer.json): add tokenizer=PATH/tokenizer.json "
            "to --model_args"
        ) from None
    tok = load_tokenizer(found)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {tok.path} has {tok.vocab_size} ids, more than the model's "
            f"model.vocab_size={cfg.model.vocab_size}: give the tokenizer the model was trained "
            "with (tokenizer=)"
        )
    return tok


def _batching(
    batch_size: int | str | None, max_batch_size: int | None
) -> tuple[int | None, int | None]:
    """(requests per forward, None for auto; the most requests per forward of auto)."""
    cap = _positive("max_batch_size", max_batch_size, 1) if max_batch_size else None
    if batch_size is None or str(batch_size).startswith("auto"):
        return None, cap
    try:
        rows = int(batch_size)
    except ValueError:
        raise ConfigError(f"--batch_size {batch_size}: give a number of requests or auto") from None
    return _positive("--batch_size", rows, 1), cap


def _positive(name: str, value: Any, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f"{name}={value!r}: give an integer >= {least}")
    return value


def _device(device: str | None) -> torch.device:
    import torch

    if not device or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's --device defaults to cuda:0; its hf backend falls back to the CPU as well.
        log.warning("device %s: CUDA is not available, using the CPU", device)
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a torch device (cpu, cuda, cuda:1)") from None


# -- registration ----------------------------------------------------------------------------


def register() -> None:
    """Put ``kha-train`` into lm-eval's model registry (idempotent), as a lazy placeholder that
    names this module, so the class it resolves to is the same however this module was run."""
    import lm_eval.models  # noqa: F401  lm-eval imports its own models only into an empty registry
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def main(argv: list[str] | None = None) -> int:
    """``python -m kha_train.tools.lm_eval_model ARGS``: lm-eval's command line (what its
    ``lm_eval`` script runs) with ``kha-train`` registered. Our --model_args are checked before
    lm-eval indexes its few thousand task files (tens of seconds), and our errors print as one
    ``error:`` line (exit code 2)."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()
        if getattr(args, "model", None) == MODEL_NAME:
            check_model_args(**(getattr(args, "model_args", None) or {}))
        parser.execute(args)
    except ValueError as e:  # ConfigError (DataError), WeightsError: they name the fix
        if not isinstance(e, ConfigError) and not type(e).__module__.startswith("kha_train"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


register()

if __name__ == "__main__":
    from kha_train.tools.lm_eval_model import main as _main  # the registered module's main

    sys.exit(_main())
