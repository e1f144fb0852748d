"""What was in a spike's batch: its samples of the highest loss, decoded (``logging.spikes``).

A training step computes only its batch's mean loss (and must stay as it is), so the loss of
each sample is not known when a spike is seen. At the drain that finds spikes, the monitor
(``monitor.py``) asks this module to score the worst spike steps again, once:

    steps   the spike steps of the drain (detector spikes and steps the spike guard skipped or
            gave in to), the highest z first: ``explain_top`` per drain, ``explain_max`` per run
    read    every sample of each step's global batch, by its id (sample i is tokens
            [i*T, i*T + T + 1) of the train split, as the loader reads it)
    score   a no-grad forward in eval mode, ``model(ids, labels, reduction="none")``, in
            micro-batches of ``train.micro_batch_size`` (the training shape): each sample's mean
            next-token loss. As in evaluation, nothing of the training state moves (no MoE
            expert counts, no aux loss, no gradient, no RNG)
    keep    the ``explain_samples`` samples of the highest loss, decoded with the run's tokenizer
            (``data.tokenizer``, else the dataset's tokenizer.json), ``explain_chars`` of each

The result goes into the spike record (``top_samples``, with ``scored_at_step`` and the batch's
mean loss at that step, ``scored_batch_loss``): the weights are those of the drain, up to
``logging.log_every`` steps after the spike, and include the spike step's own update unless it
was skipped. ``kha-train spikes RUN_DIR`` prints them.

Collective: every rank drains at the same step and sees the same spikes (the values are
global), so every rank calls :meth:`SpikeExplainer.explain` with the same steps; each scores a
contiguous share of the samples (FSDP2's forward gathers the weights: every rank must run the
same number of forwards, so a rank that cannot read its samples scores zeros and reports NaN for
them), then one all-gather gives every rank all the losses; rank 0 decodes. Nothing here stops
training: a missing tokenizer leaves the text out, a read error a NaN loss.

Cost: one forward (no backward) over each explained step's global batch, about a third of a
training step's compute, only at spikes and at most ``explain_max`` times per run.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kha_train.config import Config
from kha_train.data.shards import DatasetIndex, read_index
from kha_train.model.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from kha_train.data.tokenizer import LoadedTokenizer


class SampleReader:
    """Samples of one split by id, memory-mapping only the shards they lie in (the loader's
    ``TokenStream`` range-checks every shard when it opens: too slow to repeat mid-run)."""

    def __init__(self, index: DatasetIndex, seq_len: int, split: str = "train") -> None:
        self.index, self.seq_len = index, seq_len
        self.shards = [s for s in index.splits[split].shards if s.tokens]
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + s.tokens)
        self._maps: dict[int, np.ndarray] = {}

    def tokens(self, sample: int) -> np.ndarray:
        """Tokens [i*T, i*T + T + 1) of sample ``i``: (T + 1,) int64."""
        start, stop = sample * self.seq_len, sample * self.seq_len + self.seq_len + 1
        if not 0 <= start < stop <= self.starts[-1]:
            raise IndexError(f"sample {sample} is outside the split ({self.starts[-1]} tokens)")
        out = np.empty(stop - start, dtype=np.int64)
        i, pos = bisect.bisect_right(self.starts, start) - 1, start
        while pos < stop:
            lo, hi = pos - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            out[pos - start : pos - start + hi - lo] = self._map(i)[lo:hi]
            pos += hi - lo
            i += 1
        if out.max() >= self.index.vocab_size:
            raise ValueError(f"sample {sample} holds ids outside the vocab: the data changed")
        return out

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            path = self.index.directory / self.shards[i].file
            self._maps[i] = np.memmap(path, dtype=self.index.dtype.newbyteorder("<"), mode="r")
        return self._maps[i]


@dataclass
class Explanation:
    """The re-scored batch of one spike step (the same on every rank, texts on rank 0 only)."""

    step: int
    scored_at_step: int
    batch_loss: float  # mean of the per-sample losses at ``scored_at_step`` (NaN ones left out)
    samples: list[dict[str, Any]] = field(default_factory=list)  # id, loss, text: worst first
    recorded: bool = False  # already in a spike record (else the spike guard's record takes it)

    def record_fields(self) -> dict[str, Any]:
        """What goes into the spike record."""
        return {
            "scored_at_step": self.scored_at_step,
            "scored_batch_loss": self.batch_loss,
            "top_samples": self.samples,
        }


class SpikeExplainer:
    """Scores spike steps' batches again and keeps their worst samples (module docstring)."""

    def __init__(self, cfg: Config, rank: int, world_size: int) -> None:
        sp = cfg.logging.spikes
        self.top, self.max_total = sp.explain_top, sp.explain_max
        self.samples, self.chars = sp.explain_samples, sp.explain_chars
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.explained = 0  # spike steps explained in this run (checkpointed by the monitor)
        self._index: DatasetIndex | None = None
        self._reader: SampleReader | None = None
        self._tokenizer: LoadedTokenizer | None = None
        self._tokenizer_error: str | None = None

    @property
    def enabled(self) -> bool:
        return self.top > 0 and self.explained < self.max_total

    def choose(self, z_by_step: dict[int, float]) -> list[int]:
        """The steps to explain among ``{step: highest z}`` (the highest z first, then the
        earliest step), within this drain's and this run's limits. Counts them as explained."""
        if not self.enabled:
            return []
        ranked = sorted(z_by_step, key=lambda s: (-_finite_or(z_by_step[s], math.inf), s))
        chosen = ranked[: min(self.top, self.max_total - self.explained)]
        self.explained += len(chosen)
        return chosen

    @torch.no_grad()
    def explain(
        self, model: nn.Module, steps: list[int], sample_ids: dict[int, list[int]], now: int
    ) -> dict[int, Explanation]:
        """Score the global batch of each of ``steps`` (``sample_ids[step]``: its ids, every
        rank's in rank order) with ``model`` at step ``now``. A collective: every rank calls it
        with the same arguments."""
        if not steps:
            return {}
        pairs = [(s, i) for s in steps for i in sample_ids[s]]  # (step, sample id), all ranks
        share = -(-len(pairs) // self.world_size)  # the last rank may get fewer (padded)
        mine = pairs[self.rank * share : (self.rank + 1) * share]
        device = next(model.parameters()).device
        local = torch.full((share,), float("nan"), device=device)
        mb = self.cfg.train.micro_batch_size
        was_training = model.training
        model.eval()
        try:
            for j in range(0, share, mb):
                chunk = mine[j : j + mb]
                tokens, ok = self._read([i for _, i in chunk], mb)  # (mb, T + 1), (mb,)
                tokens = tokens.to(device)
                inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
                nll = model(inputs, targets, reduction="none")  # (mb, T) fp32
                labels = targets != IGNORE_INDEX
                mean = (nll * labels).sum(1) / labels.sum(1).clamp_min(1)  # (mb,)
                mean = torch.where(ok.to(device), mean.float(), float("nan"))
                local[j : j + len(chunk)] = mean[: len(chunk)]
        finally:
            model.train(was_training)
        if self.world_size > 1:
            out = torch.empty(self.world_size * share, device=device)
            dist.all_gather_into_tensor(out, local)
            local = out
        losses = local[: len(pairs)].tolist()  # the host sync
        by_step: dict[int, list[tuple[float, int]]] = {s: [] for s in steps}
        for (s, i), loss in zip(pairs, losses, strict=True):
            by_step[s].append((loss, i))
        return {s: self._keep(s, now, scored) for s, scored in by_step.items()}

    def _read(self, ids: list[int], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` samples' tokens (missing rows and unreadable samples: zeros) and which were
        read. Never raises: the forward that follows is a collective."""
        T = self.cfg.data.seq_len
        out = np.zeros((rows, T + 1), dtype=np.int64)
        ok = np.zeros(rows, dtype=bool)
        try:
            reader = self._sample_reader()
        except Exception:
            return torch.from_numpy(out), torch.from_numpy(ok)
        for r, i in enumerate(ids):
            try:
                out[r] = reader.tokens(i)
                ok[r] = True
            except Exception:
                pass
        return torch.from_numpy(out), torch.from_numpy(ok)

    def _keep(self, step: int, now: int, scored: list[tuple[float, int]]) -> Explanation:
        finite = [(loss, i) for loss, i in scored if math.isfinite(loss)]
        batch = sum(loss for loss, _ in finite) / len(finite) if finite else math.nan
        worst = sorted(finite, key=lambda x: (-x[0], x[1]))[: self.samples]
        samples = [{"id": i, "loss": loss} for loss, i in worst]
        if self.rank == 0:
            for s in samples:
                s.update(self._text(s["id"]))
        return Explanation(step, now, batch, samples)

    def _text(self, sample: int) -> dict[str, Any]:
        """``text`` (the first ``explain_chars`` characters of the decoded sample, None without
        a tokenizer) and ``truncated``; ``text_error`` says why there is no text."""
        tok = self._load_tokenizer()
        if tok is None:
            return {"text": None, "text_error": self._tokenizer_error}
        try:
            text = tok.decode(self._sample_reader().tokens(sample).tolist())
        except Exception as e:
            return {"text": None, "text_error": f"{type(e).__name__}: {e}"}
        return {"text": text[: self.chars], "truncated": len(text) > self.chars}

    def _dataset(self) -> DatasetIndex:
        if self._index is None:
            self._index = read_index(self.cfg.data.dataset)
        return self._index

    def _sample_reader(self) -> SampleReader:
        if self._reader is None:
            self._reader = SampleReader(self._dataset(), self.cfg.data.seq_len)
        return self._reader

    def _load_tokenizer(self) -> LoadedTokenizer | None:
        if self._tokenizer is None and self._tokenizer_error is None:
            try:
                from kha_train.training.evaluator import run_tokenizer

                self._tokenizer = run_tokenizer(self.cfg, self._dataset())
            except Exception as e:
                self._tokenizer_error = f"no tokenizer to decode the samples: {e}"
        return self._tokenizer


def _finite_or(x: float, default: float) -> float:
    return x if math.isfinite(x) else default
