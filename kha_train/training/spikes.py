"""Loss-spike detection: running statistics of the loss and the gradient norm.

For each metric the detector keeps the last ``window`` finite values. Once ``warmup`` values
have been seen, a new value is a spike when it exceeds ``mean + z_threshold * std`` of the window
*before* it (the value is then added to the window, so a lasting level shift stops being flagged
after a while instead of being flagged forever). Each spike is recorded with its step, value,
z-score, ratio to the window mean, the step's loss and grad norm, and the global sample indices
of that step's batch, so the offending data can be looked up.

Non-finite values are not observed here (the trainer skips and counts those steps).

The worst spikes are then explained by the monitor (``spike_explain.py``): their batch is scored
again and the samples of the highest loss are decoded into the spike record (``top_samples``).

With the spike guard on (``optim.skip_step``, ``spike_guard.py``), the detector follows the
guard's window: a step the guard skipped is flagged (its record says ``skipped``) but not added
to the windows, and a guard reset empties them, as it empties the guard's. The test is the same
(value > mean + z_threshold x std, std with n - 1, of the window before the value) and so are
the default window (128) and threshold (6), so with equal settings both flag the same steps (up
to the last bit of float rounding: the guard computes on the device); only the detector's warmup
is shorter (20 against the guard's min_history 64): it logs, it does not skip. Without the guard
every finite value enters the windows.

The detector is ``Stateful``: its windows and counters are checkpointed, so a resumed run flags
exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

METRICS = ("loss", "grad_norm")


@dataclass
class Spike:
    step: int  # the optimizer step (1-based: the step counter after the step)
    metric: str  # "loss" or "grad_norm"
    value: float
    mean: float  # window mean before this value
    std: float  # window std before this value
    z: float  # (value - mean) / std
    ratio: float  # value / mean
    loss: float
    grad_norm: float
    sample_ids: list[int] = field(default_factory=list)  # global sample indices of the batch
    skipped: bool = False  # the spike guard skipped this step (its update was not applied)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "spike", **asdict(self)}


class SpikeDetector:
    """Flags values above ``mean + z_threshold * std`` of a running window (see module doc)."""

    def __init__(self, window: int, z_threshold: float, warmup: int) -> None:
        self.window = window
        self.z_threshold = z_threshold
        self.warmup = warmup
        self._values: dict[str, deque[float]] = {m: deque(maxlen=window) for m in METRICS}
        self._seen = 0  # finite steps observed
        self.num_spikes = 0
        self.spikes_by_metric: dict[str, int] = {m: 0 for m in METRICS}

    def observe(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        sample_ids: list[int] | None = None,
        *,
        accepted: bool = True,
        restart: bool = False,
    ) -> list[Spike]:
        """Feed one step's values; return the spikes they contain (zero, one or two).

        ``accepted=False``: the spike guard skipped the step: check it, do not add it to the
        windows. ``restart``: the guard restarted its window at this step: check it, then empty
        the windows and start them with it."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return []
        values = {"loss": loss, "grad_norm": grad_norm}
        spikes = []
        for metric in METRICS:
            window = self._values[metric]
            value = values[metric]
            if self._seen >= self.warmup and len(window) >= 2:
                mean = sum(window) / len(window)
                std = math.sqrt(sum((v - mean) ** 2 for v in window) / (len(window) - 1))
                if std > 0 and value > mean + self.z_threshold * std:
                    spikes.append(
                        Spike(
                            step=step,
                            metric=metric,
                            value=value,
                            mean=mean,
                            std=std,
                            z=(value - mean) / std,
                            ratio=value / mean if mean else math.inf,
                            loss=loss,
                            grad_norm=grad_norm,
                            sample_ids=list(sample_ids or []),
                            skipped=not accepted,
                        )
                    )
        if restart:
            for window in self._values.values():
                window.clear()
            self._seen = 0
        if accepted:
            for metric in METRICS:
                self._values[metric].append(values[metric])
            self._seen += 1
        self.num_spikes += len(spikes)
        for s in spikes:
            self.spikes_by_metric[s.metric] += 1
        return spikes

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "values": {m: list(v) for m, v in self._values.items()},
            "seen": self._seen,
            "num_spikes": self.num_spikes,
            "spikes_by_metric": dict(self.spikes_by_metric),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A changed window keeps the newest values that fit.
        self._values = {m: deque(state["values"][m], maxlen=self.window) for m in METRICS}
        self._seen = int(state["seen"])
        self.num_spikes = int(state["num_spikes"])
        self.spikes_by_metric = {m: int(state["spikes_by_metric"].get(m, 0)) for m in METRICS}


def dominant_part(grad_norm_parts: dict[str, Any] | None) -> str:
    """The part of the model (``grad_parts.py``) with the largest share of a step's squared
    gradient norm, and the share: "router 91%"; "-" for a record without the split."""
    parts = {k: v for k, v in (grad_norm_parts or {}).items() if isinstance(v, (int, float))}
    total = sum(v * v for v in parts.values())
    if not parts or not total > 0:
        return "-"
    part, value = max(parts.items(), key=lambda kv: kv[1])
    return f"{part} {value * value / total:.0%}"
