"""The packed, resumable, rank-aware loader the trainer iterates.

Sample ``i`` of a split is tokens ``[i*T, i*T + T + 1)`` of the split's flat token stream
(``T = seq_len``): consecutive samples share one boundary token, so every token is a target
exactly once per epoch. Samples are packed across document boundaries; ``Batch.doc_ids`` and
``Batch.positions`` say where the documents (separated by EOS) start and end.

Order (train): the global sequence of :mod:`kha_train.data.order`. One optimizer step takes the
next ``global_batch_size`` global indices; rank ``r`` takes the ``r``-th contiguous slice of
``global_batch_size // world_size`` of them, as ``micro_batches_per_step`` micro-batches. The
data position is the global index of the next step (``state_dict()['sample_index']``), so
resuming is exact and works for any world size (and any global batch size).

Skipped ranges (``data.skip_ranges``, and those a rollback adds with :meth:`PackedLoader.
skip_steps`): a step takes the next global indices that are not in a skipped range, so skipped
samples are never read. The resolved ranges (global indices, half-open) are part of the state
and win over the config on a resume; ``data.skip_ranges`` entries the state does not know are
resolved against the resumed position (see :meth:`PackedLoader.load_state_dict`).

Validation (``split="val"``): file order, no shuffle. Micro-batch ``j`` of rank ``r`` holds
samples ``[(j*W + r)*mb, (j*W + r + 1)*mb)``. ``eval_batches(n)`` starts from the beginning on
every call, so every validation pass sees the same data.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kha_train.data.errors import DataError
from kha_train.config_checks import parse_skip_range
from kha_train.data.order import GlobalOrder, SkipRanges
from kha_train.data.prefetch import Prefetcher
from kha_train.data.shards import DatasetIndex, TokenStream, read_index

if TYPE_CHECKING:
    from kha_train.config import Config

STATE_FORMAT = "kha-train-loader"
STATE_VERSION = 1


@dataclass
class Batch:
    """One micro-batch. B = micro_batch_size, T = seq_len."""

    input_ids: torch.Tensor  # (B, T) int64: tokens [0, T) of each sample
    labels: torch.Tensor  # (B, T) int64: tokens [1, T]: the next token at every position
    doc_ids: torch.Tensor  # (B, T) int64: document number within the sample (0, 1, ...)
    positions: torch.Tensor  # (B, T) int64: position within its document (0 after each EOS)
    sample_ids: torch.Tensor  # (B,) int64: sample index within the split (tokens i*T ...)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=non_blocking) for k, v in self._items()})

    def pin_memory(self) -> Batch:
        return Batch(**{k: v.pin_memory() for k, v in self._items()})

    def _items(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, getattr(self, k)) for k in self.__dataclass_fields__]


class _BatchMaker:
    """Builds micro-batches from sample ids. Holds no reference to the loader, so a prefetch
    thread running it never keeps a dropped loader alive."""

    def __init__(self, stream: TokenStream, seq_len: int, eos_id: int, pin: bool) -> None:
        self.stream, self.seq_len, self.eos_id, self.pin = stream, seq_len, eos_id, pin

    def make(self, sample_ids: np.ndarray) -> Batch:
        T = self.seq_len
        tokens = np.stack([self.stream.read(i * T, i * T + T + 1) for i in sample_ids])  # (B, T+1)
        x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
        starts = np.ones_like(x, dtype=bool)  # a document starts at 0 and after every EOS
        starts[:, 1:] = x[:, :-1] == self.eos_id
        doc_ids = np.cumsum(starts, axis=1) - 1
        t = np.broadcast_to(np.arange(T), x.shape)
        positions = t - np.maximum.accumulate(np.where(starts, t, 0), axis=1)
        batch = Batch(
            input_ids=torch.from_numpy(np.ascontiguousarray(x)),
            labels=torch.from_numpy(np.ascontiguousarray(y)),
            doc_ids=torch.from_numpy(doc_ids),
            positions=torch.from_numpy(positions),
            sample_ids=torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)),
        )
        return batch.pin_memory() if self.pin else batch

    def train_batches(
        self,
        order: GlobalOrder,
        start: int,
        gbs: int,
        rank: int,
        world_size: int,
        mb: int,
        skips: SkipRanges,
    ) -> Iterator[Batch]:
        per_rank = gbs // world_size
        while True:
            # This optimizer step's samples, all ranks (the next gbs indices not skipped).
            step = skips.sample_ids(order, start, gbs) if skips else order.sample_ids(start, gbs)
            mine = step[rank * per_rank : (rank + 1) * per_rank]
            for j in range(0, per_rank, mb):
                yield self.make(mine[j : j + mb])
            start = skips.advance(start, gbs)

    def eval_batches(self, n: int, rank: int, world_size: int, mb: int) -> Iterator[Batch]:
        for j in range(n):
            first = (j * world_size + rank) * mb
            yield self.make(np.arange(first, first + mb))


class PackedLoader:
    """Micro-batches of packed samples for one rank; see the module docstring for the order.

    Iterating a train loader yields micro-batches forever (``next_step()`` takes one optimizer
    step's worth); iterating a val loader yields every full val micro-batch once.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike[str],
        split: str = "train",
        *,
        seq_len: int,
        micro_batch_size: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        prefetch: int = 2,
        expected_vocab_size: int | None = None,
        expected_tokenizer_hash: str | None = None,
        skip_ranges: Sequence[str] = (),
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1 or world_size < 1 or prefetch < 0:
            raise DataError(
                "seq_len, micro_batch_size and world_size must be >= 1 and prefetch >= 0, got "
                f"{seq_len}, {micro_batch_size}, {world_size}, {prefetch}"
            )
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
        per_micro = micro_batch_size * world_size
        if global_batch_size < per_micro or global_batch_size % per_micro:
            raise DataError(
                f"global batch of {global_batch_size} samples must be a positive multiple of "
                f"micro_batch_size x ranks = {micro_batch_size} x {world_size} = {per_micro} "
                "(set train.global_batch_tokens to a multiple of micro_batch_size x seq_len x ranks)"
            )
        self.index: DatasetIndex = read_index(dataset_dir)
        self._check_expected(expected_vocab_size, expected_tokenizer_hash)
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.device = torch.device(device)
        self.micro_batches_per_step = global_batch_size // per_micro
        stream = TokenStream(self.index, split)
        self.num_samples = (stream.num_tokens - 1) // seq_len  # each reads seq_len + 1 tokens
        self._check_size()
        self._maker = _BatchMaker(stream, seq_len, self.index.eos_id, self.device.type == "cuda")
        self._order = GlobalOrder(self.num_samples, seed, shuffle=split == "train")
        self._sample_index = 0  # global index of the first sample of the step being yielded
        self._micro = 0  # micro-batches of that step already yielded
        self._source: Iterator[Batch] | None = None
        self._step = 0  # optimizer steps taken (resumed from the state)
        # Skipped ranges, each {"start", "end" (global indices, half-open), "source" (manual |
        # rollback), "spec" (the data.skip_ranges entry) or "rollback" (its number)}.
        self._skip_specs = [str(x).strip() for x in skip_ranges]
        for spec in self._skip_specs:
            parse_skip_range(spec)  # a bad entry is a ConfigError now
        if self._skip_specs and split != "train":
            raise DataError("skip_ranges apply to the train split only")
        self._entries: list[dict[str, Any]] = []
        self._skips = SkipRanges()
        self.notes: list[str] = []  # what resolving data.skip_ranges on a resume changed
        self._resolve_specs()

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        split: str = "train",
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> PackedLoader:
        """The loader a run's config describes: ``data.*`` for the dataset and order,
        ``train.global_batch_tokens // data.seq_len`` samples per step, and checks against
        ``model.vocab_size`` and (if ``data.tokenizer`` is set) that tokenizer's hash."""
        d, t = cfg.data, cfg.train
        tok_hash = None
        if d.tokenizer:
            from kha_train.data.tokenizer import load_tokenizer, tokenizer_hash

            tok_hash = tokenizer_hash(load_tokenizer(d.tokenizer))
        return cls(
            d.dataset,
            split,
            seq_len=d.seq_len,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_tokens // d.seq_len,
            rank=rank,
            world_size=world_size,
            seed=d.seed,
            device=device,
            prefetch=d.prefetch,
            expected_vocab_size=cfg.model.vocab_size,
            expected_tokenizer_hash=tok_hash,
            skip_ranges=d.skip_ranges if split == "train" else (),
        )

    def _check_expected(self, vocab_size: int | None, tok_hash: str | None) -> None:
        idx = self.index
        if vocab_size is not None and idx.vocab_size > vocab_size:
            raise DataError(
                f"{idx.path}: the dataset's tokenizer has {idx.vocab_size} ids but "
                f"model.vocab_size is {vocab_size}: set model.vocab_size >= {idx.vocab_size} "
                "or prepare the data with a tokenizer that fits the model"
            )
        if tok_hash is not None and tok_hash != idx.tokenizer_hash:
            raise DataError(
                f"{idx.path} was tokenized with tokenizer {idx.tokenizer_hash} "
                f"({idx.raw['tokenizer'].get('path')}), but the configured tokenizer has hash "
                f"{tok_hash}: point data.tokenizer at the dataset's tokenizer, or re-run "
                f"`kha-train data prepare --tokenizer YOUR_TOKENIZER --out NEW_DIR`"
            )

    def _check_size(self) -> None:
        if self.split == "train" and self.num_samples < self.global_batch_size:
            raise DataError(
                f"{self.index.path}: the train split holds {self.num_samples} samples of "
                f"seq_len + 1 = {self.seq_len + 1} tokens, fewer than one global batch of "
                f"{self.global_batch_size}: {self._settings_that_fit()}, or use more data"
            )
        if self.split == "val" and self.num_samples < self.micro_batch_size * self.world_size:
            raise DataError(
                f"{self.index.path}: the val split holds {self.num_samples} samples of "
                f"{self.seq_len + 1} tokens, fewer than one micro-batch on every rank "
                f"({self.micro_batch_size} x {self.world_size}): prepare with a larger "
                "--val-fraction or use a smaller micro batch"
            )

    def _settings_that_fit(self) -> str:
        """The nearest settings under which the train split holds one global batch: a smaller
        batch at this seq_len, else a shorter seq_len (halved until one micro-batch per rank
        fits)."""
        per_step = self.micro_batch_size * self.world_size  # samples of the smallest batch
        fits = self.num_samples // per_step * per_step
        if fits:
            return (
                f"set train.global_batch_tokens={fits * self.seq_len} (at most {fits} samples "
                f"per step at data.seq_len={self.seq_len})"
            )
        tokens = self.num_samples * (self.seq_len + 1)
        seq = self.seq_len // 2
        while seq >= 16 and tokens // (seq + 1) < per_step:
            seq //= 2
        if seq < 16:
            return "the split is too small to train on"
        fits = tokens // (seq + 1) // per_step * per_step
        return (
            f"set data.seq_len={seq} train.global_batch_tokens={fits * seq} (the split then "
            f"holds {fits} samples per step of {self.micro_batch_size} x {self.world_size} "
            "rank(s) micro-batches)"
        )

    # -- iteration -------------------------------------------------------------------------------

    def _start(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        return Prefetcher(batches, self.prefetch) if self.prefetch > 0 else batches

    def _stop(self) -> None:
        if isinstance(self._source, Prefetcher):
            self._source.close()
        self._source = None

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        return batch.to(self.device, non_blocking=self.device.type == "cuda")

    def __iter__(self) -> Iterator[Batch]:
        if self.split != "train":
            return self.eval_batches(self.num_eval_batches)
        return self

    def __next__(self) -> Batch:
        if self.split != "train":
            raise TypeError("iterate a val loader with eval_batches(n) or iter(loader)")
        if self._source is None:
            gen = self._maker.train_batches(
                self._order, self._sample_index, self.global_batch_size, self.rank,
                self.world_size, self.micro_batch_size, self._skips,
            )  # fmt: skip
            self._source = self._start(gen)
        batch = next(self._source)
        self._micro += 1
        if self._micro == self.micro_batches_per_step:
            self._micro = 0
            self._sample_index = self._skips.advance(self._sample_index, self.global_batch_size)
            self._step += 1
        return self._to_device(batch)

    def next_step(self) -> list[Batch]:
        """The micro-batches of the next optimizer step (``micro_batches_per_step`` of them)."""
        if self._micro:
            raise RuntimeError(
                f"next_step() called after {self._micro} micro-batch(es) of a step were taken "
                "with next(): use one or the other"
            )
        return [next(self) for _ in range(self.micro_batches_per_step)]

    @property
    def num_eval_batches(self) -> int:
        """Full micro-batches of this split on every rank when read in file order."""
        return self.num_samples // (self.micro_batch_size * self.world_size)

    def eval_batches(self, n: int) -> Iterator[Batch]:
        """``n`` micro-batches from the start of the split in file order (fewer, with a warning,
        if the split is smaller). Every call yields the same batches."""
        available = self.num_eval_batches
        if n > available:
            warnings.warn(
                f"{self.index.path}: the {self.split} split has only {available} micro-batches "
                f"of {self.micro_batch_size} x {self.world_size} ranks; using {available}, not {n}",
                stacklevel=2,
            )
            n = available
        source = self._start(
            self._maker.eval_batches(n, self.rank, self.world_size, self.micro_batch_size)
        )
        try:
            for batch in source:
                yield self._to_device(batch)
        finally:
            if isinstance(source, Prefetcher):
                source.close()

    # -- position --------------------------------------------------------------------------------

    @property
    def sample_index(self) -> int:
        """Global index of the first sample of the next optimizer step."""
        return self._sample_index

    @property
    def epoch(self) -> int:
        return self._sample_index // self.num_samples

    @property
    def step(self) -> int:
        """Optimizer steps taken (``next_step()`` calls, counted across resumes)."""
        return self._step

    # -- skipped ranges --------------------------------------------------------------------------

    @property
    def skip_entries(self) -> list[dict[str, Any]]:
        """Every skipped range (copies), in the order they were added."""
        return [dict(e) for e in self._entries]

    def skipped_specs(self) -> list[str]:
        """The skipped ranges, merged, as ``samples:FIRST-LAST`` entries (inclusive) of
        ``data.skip_ranges``: a run started from them reads exactly this run's data."""
        return [f"samples:{a}-{b - 1}" for a, b in self._skips.ranges]

    def skip_steps(self, first: int, last: int, **info: Any) -> tuple[int, int]:
        """Skip the batches optimizer steps ``first..last`` (1-based, inclusive; all after the
        current step) would take; returns the range of global indices ``[start, end)``, which
        is added with ``info`` (e.g. ``source="rollback", rollback=1``)."""
        if self._micro:
            raise RuntimeError("skip_steps() in the middle of an optimizer step")
        if not self._step < first <= last:
            raise DataError(
                f"cannot skip the batches of steps {first}-{last}: the data position is at step "
                f"{self._step} (only later steps can be skipped)"
            )
        gbs = self.global_batch_size
        start = self._skips.advance(self._sample_index, (first - 1 - self._step) * gbs)
        end = self._skips.end_after(start, (last - first + 1) * gbs)
        self._add_entry({"start": start, "end": end, "source": "manual", **info})
        return start, end

    def _add_entry(self, entry: dict[str, Any]) -> None:
        self._stop()  # the prefetch thread read ahead with the old ranges
        self._entries.append(entry)
        self._skips = SkipRanges((e["start"], e["end"]) for e in self._entries)

    def _resolve_specs(self) -> None:
        """Bring the skipped ranges in line with ``data.skip_ranges``: an entry the ranges do not
        hold yet is resolved against the current position (samples: ranges first, then steps:
        ranges in order), and must not reach back into data already trained on (unless that part
        is skipped already); a manual range the config no longer lists is dropped if it lies
        wholly ahead of the position (it has changed nothing yet), else kept (the past stays as
        it was). Rollback ranges always stay."""
        pos = self._sample_index
        configured = set(self._skip_specs)
        kept = []
        for e in self._entries:
            if (
                e.get("source") == "manual"
                and e.get("spec") not in configured
                and e["start"] >= pos
            ):
                others = SkipRanges((x["start"], x["end"]) for x in self._entries if x is not e)
                if not others.covers(e["start"], e["end"]):
                    self.notes.append(
                        f"data.skip_ranges no longer lists {e.get('spec')!r}: its samples "
                        f"[{e['start']}, {e['end']}) are not skipped"
                    )
                continue
            kept.append(e)
        if len(kept) != len(self._entries):
            self._entries = []
            for e in kept:
                self._add_entry(e)
        known = {e.get("spec") for e in self._entries if e.get("source") == "manual"}
        new = [(parse_skip_range(s), s) for s in dict.fromkeys(self._skip_specs) if s not in known]
        new.sort(key=lambda x: (x[0][0] == "steps", x[0][1]))  # samples first, steps in order
        for (kind, first, last), spec in new:
            if kind == "steps":
                if first <= self._step:
                    raise DataError(
                        f"data.skip_ranges entry {spec!r}: the run resumes at step {self._step}, "
                        "so these batches (or some) were trained on already. Remove it, or resume "
                        "from a checkpoint before that step (checkpoint.resume=.../step_XXXXXXX)"
                    )
                self.skip_steps(first, last, spec=spec)
                continue
            start, end = first, last + 1
            if not self._skips.covers(start, min(end, pos)):
                raise DataError(
                    f"data.skip_ranges entry {spec!r}: the run's data position is global sample "
                    f"{pos} (step {self._step}), so samples before it were trained on already. "
                    f"Start the range at {pos} or later, or resume from an earlier checkpoint"
                )
            self._add_entry({"start": start, "end": end, "source": "manual", "spec": spec})

    def state_dict(self) -> dict[str, Any]:
        """The position after the micro-batches yielded so far (not what the prefetch thread has
        read ahead). Only valid at a step boundary."""
        if self._micro:
            raise RuntimeError(
                f"state_dict() called in the middle of an optimizer step ({self._micro} of "
                f"{self.micro_batches_per_step} micro-batches taken): save after the step"
            )
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "split": self.split,
            "sample_index": self._sample_index,
            "epoch": self.epoch,
            "step": self._step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
            "fingerprint": self.index.fingerprint,
            "dataset": str(Path(self.index.directory)),
            "global_batch_size": self.global_batch_size,
            "world_size": self.world_size,
        }
        if self._entries:
            state["skip_ranges"] = self.skip_entries
        return state

    def load_state_dict(self, state: dict[str, Any], *, keep_skips: bool = False) -> None:
        """Resume at ``state``'s position (any world size or global batch size). The seed of the
        order is taken from ``state``, so the resumed run continues the same sequence. Skipped
        ranges: those of ``state``, brought in line with ``data.skip_ranges`` (see
        :meth:`_resolve_specs`; what changed is in :attr:`notes`); ``keep_skips``: keep this
        loader's ranges instead (a rollback: they hold the state's, and those added since)."""
        where = f"data loader state (dataset {state.get('dataset', '?')})"
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not a {STATE_FORMAT} state: {str(state)[:200]}")
        if state.get("version") != STATE_VERSION:
            raise DataError(f"{where}: version {state.get('version')}, expected {STATE_VERSION}")
        if state["fingerprint"] != self.index.fingerprint:
            raise DataError(
                f"{where} was saved on a dataset with fingerprint {state['fingerprint']}, but "
                f"{self.index.path} has fingerprint {self.index.fingerprint}: resume with the "
                "original dataset (data.dataset), or start a fresh run for this one"
            )
        if state["seq_len"] != self.seq_len:
            raise DataError(
                f"{where} was saved with data.seq_len={state['seq_len']}, but this run uses "
                f"{self.seq_len}: samples would not line up; resume with data.seq_len="
                f"{state['seq_len']}"
            )
        if state["split"] != self.split:
            raise DataError(f"{where} is for split {state['split']!r}, not {self.split!r}")
        self._stop()
        self.seed = int(state["seed"])
        self._order = GlobalOrder(self.num_samples, self.seed, shuffle=self.split == "train")
        self._sample_index = int(state["sample_index"])
        self._micro = 0
        # States from before the step counter: steps of the batch size they were saved with.
        saved_gbs = int(state.get("global_batch_size", self.global_batch_size))
        self._step = int(state.get("step", self._sample_index // max(1, saved_gbs)))
        if keep_skips:
            return
        self._entries = []
        self._skips = SkipRanges()
        for e in state.get("skip_ranges", []):
            self._add_entry(dict(e))
        self._resolve_specs()

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the prefetch thread (also done when the loader is garbage-collected)."""
        self._stop()

    def __enter__(self) -> PackedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._stop()
