"""`kha-train generate`: text from a trained model, decoded over a KV cache.

    kha-train generate runs/my-run --prompt "Once upon a time" --max-new-tokens 64
    kha-train generate runs/my-run/checkpoints/step_0001000 --prompts-file prompts.txt \\
        --temperature 0.7 --top-p 0.9 --seed 1
    kha-train generate weights.safetensors --config run.yaml --prompt "def f(" --temperature 0

SOURCE is a run directory (its newest complete checkpoint under ``checkpoints/``), a checkpoint
directory holding step folders, a ``step_XXXXXXX`` folder, or a weights file with ``--config``.
The tokenizer is ``--tokenizer``, else the run's ``data.tokenizer``, else the dataset's
``tokenizer.json`` (beside its index.json, or where index.json says it was).

Several prompts (``--prompts-file``, one per line) run as one batch, left-padded (see
model/kv_cache.py). Each sequence stops at the tokenizer's EOS or after ``--max-new-tokens``.
A single prompt is streamed to the terminal as it is decoded. Sampling: ``--temperature 0``
is greedy (argmax); otherwise softmax(logits / temperature) restricted to the ``--top-k`` most
likely tokens and the smallest set whose probability reaches ``--top-p``, drawn from a
generator seeded by ``--seed``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kha_train.config import Config
    from kha_train.model import Transformer


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def sample_next(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token [B] from the last position's logits [B, V]."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the ones before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[list[list[int]]], None] | None = None,
) -> list[list[int]]:
    """The new token ids of every prompt, without the EOS that ended a sequence; greedy when
    ``sampling`` is None. Prompts of different lengths are left-padded into one batch;
    ``on_step`` is called with the tokens so far after every decoding step (streaming)."""
    sampling = sampling or Sampling(temperature=0.0)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.head_weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long)  # pads: any id, the mask hides them
    mask = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[b, P - len(p) :] = 1
    cache = model.new_cache()
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * B
    if max_new_tokens <= 0:
        return out
    logits = model(ids.to(device), cache=cache, attention_mask=mask.to(device))[:, -1]  # (B, V)
    for step in range(max_new_tokens):
        token = sample_next(logits, sampling, generator)  # (B,)
        for b, t in enumerate(token.tolist()):
            if done[b]:
                continue
            if t == eos_id:
                done[b] = True
            else:
                out[b].append(t)
        if on_step is not None:
            on_step(out)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache)[:, -1]  # (B, V)
    return out


class _Streamer:
    """Prints a sequence's text as its tokens arrive (only complete characters: a byte-level
    token may end inside a UTF-8 character, which decodes to U+FFFD until the rest comes)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode, self.shown = decode, ""

    def __call__(self, out: list[list[int]]) -> None:
        text = self.decode(out[0])
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown) :])
            sys.stdout.flush()
        self.shown = text

    def finish(self, out: list[list[int]]) -> None:
        text = self.decode(out[0])
        sys.stdout.write(text[len(self.shown) :] if text.startswith(self.shown) else "")
        sys.stdout.write("\n")
        sys.stdout.flush()


def resolve_source(source: Path) -> Path:
    """The weights a SOURCE names: a file or a checkpoint folder as is; a run directory or a
    checkpoint directory -> its newest complete step folder."""
    from kha_train.config import ConfigError
    from kha_train.training.checkpoint import latest_checkpoint

    if not source.is_dir() or (source / ".metadata").is_file():
        return source
    for folder in (source / "checkpoints", source):
        ckpt = latest_checkpoint(folder)
        if ckpt is not None:
            return ckpt
    raise ConfigError(
        f"{source}: no complete checkpoint in it or in its checkpoints/ folder (give a run "
        "directory, its checkpoint.dir, a step_XXXXXXX folder, or a weights file with --config)"
    )


def find_generation_tokenizer(cfg: Config, explicit: str | None) -> Path:
    """--tokenizer, else data.tokenizer, else the dataset's tokenizer.json (in its folder, or
    where its index.json says it came from)."""
    import json

    from kha_train.data.errors import DataError

    if explicit:
        return Path(explicit)
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    beside = Path(cfg.data.dataset) / "tokenizer.json"
    if beside.is_file():
        return beside
    try:
        index = json.loads((Path(cfg.data.dataset) / "index.json").read_text())
        recorded = Path(index["tokenizer"]["path"])
    except (OSError, ValueError, TypeError, KeyError):
        recorded = None
    if recorded is not None and recorded.exists():
        return recorded
    raise DataError(
        f"no tokenizer found for this run (data.tokenizer is unset and neither {beside} nor "
        "the dataset's index.json names an existing tokenizer): pass --tokenizer PATH"
    )


def run_generate(args: argparse.Namespace) -> int:
    from kha_train.config import ConfigError
    from kha_train.data.tokenizer import load_tokenizer
    from kha_train.tools.weights_io import load_model, load_source_config

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: give at least 1")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature and --top-k must be >= 0, --top-p in (0, 1]")
    source = resolve_source(Path(args.source))
    cfg = load_source_config(source, args.config, args.overrides)
    tok = load_tokenizer(find_generation_tokenizer(cfg, args.tokenizer))
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {tok.path} has {tok.vocab_size} ids, more than the model's vocabulary "
            f"({cfg.model.vocab_size}): give the tokenizer the model was trained with"
        )
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        try:
            texts = [t for t in Path(args.prompts_file).read_text().splitlines() if t.strip()]
        except OSError as e:
            raise ConfigError(f"--prompts-file {args.prompts_file}: {e.strerror}") from e
        if not texts:
            raise ConfigError(f"--prompts-file {args.prompts_file} holds no prompt")
    # An empty prompt starts a new document: the EOS that precedes every document in training.
    prompts = [tok.encode(t) or [tok.eos_id] for t in texts]
    if max(map(len, prompts)) + args.max_new_tokens > cfg.data.seq_len:
        print(
            f"warning: prompt + --max-new-tokens exceeds the trained sequence length "
            f"{cfg.data.seq_len}; RoPE goes on, quality may not",
            file=sys.stderr,
        )

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    model = load_model(cfg.model, source, device).eval()
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    streamer = _Streamer(tok.decode) if len(prompts) == 1 else None
    if streamer is not None:
        sys.stdout.write(texts[0])
        sys.stdout.flush()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = generate(
            model,
            prompts,
            args.max_new_tokens,
            sampling,
            eos_id=None if args.ignore_eos else tok.eos_id,
            generator=generator,
            on_step=streamer,
        )
    seconds = time.perf_counter() - start
    if streamer is not None:
        streamer.finish(out)
    else:
        for i, (text, new) in enumerate(zip(texts, out)):
            print(f"--- prompt {i + 1} ---\n{text}{tok.decode(new)}")
    n = sum(map(len, out))
    print(
        f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s) from {source}",
        file=sys.stderr,
    )
    return 0
