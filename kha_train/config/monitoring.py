"""The ``logging`` section: the run directory, metric loggers and spike detection."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class WandbMode(enum.StrEnum):
    auto = "auto"  # online if WANDB_API_KEY is set or logged in, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class SpikeConfig:
    """Spike detection for the logs (training/spikes.py): it flags, it never skips (that is
    optim.skip_step, which uses the same z-score; with it on, skipped steps stay out of both
    windows)."""

    window: int = 128  # running statistics over the last N steps
    z_threshold: float = 6.0  # a spike: value > mean + z_threshold * std of the window
    warmup: int = 20  # steps observed before any spike can be flagged
    # Explaining spikes (training/spike_explain.py): at the drain that finds them, the spike
    # steps with the highest z (detector spikes and steps the spike guard skipped) have their
    # global batch scored again (one no-grad forward over it, all ranks sharing it) and the
    # samples with the highest loss are decoded into the spike record (`kha-train spikes`).
    explain_top: int = 2  # spike steps explained per drain, the highest z first; 0: off
    explain_max: int = 50  # spike steps explained per run (the cost stays bounded)
    explain_samples: int = 3  # samples kept per explained step, the highest mean loss first
    explain_chars: int = 500  # decoded text kept per sample (characters, from its start)


@dataclass
class LoggingConfig:
    run_dir: str = "runs/${name}"  # everything a run writes: config, logs, plots, checkpoints
    log_every: int = 10  # steps between metric logs (the only host syncs of the loop)
    wandb: WandbMode = WandbMode.auto
    wandb_project: str = "kha-train"
    wandb_entity: str | None = None
    tensorboard: bool = False
    peak_tflops: float | None = None  # MFU denominator per GPU; default from a GPU table
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
