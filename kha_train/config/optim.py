"""The ``optim`` and ``schedule`` sections: AdamW, gradient clipping, skipped steps and the
learning-rate schedule."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ClipMode(enum.StrEnum):
    global_norm = "global_norm"  # scale all gradients by min(1, grad_clip / global norm)
    zclip = "zclip"  # z-score of the global norm against its EMA (optim.zclip; Kumar et al. 2025)
    adagc = "adagc"  # each tensor against the EMA of its own norm (optim.adagc; Wang et al. 2025)


@dataclass
class ZClipConfig:
    """optim.clip_mode=zclip (ZClip, arXiv:2504.02507; defaults are those of the authors' code,
    github.com/bluorion-com/ZClip): after ``warmup`` steps the global grad norm g has an EMA
    mean m and variance v; when z = (g - m) / sqrt(v) > z_threshold, g is clipped to
    m + z_threshold^2 sqrt(v) / z, and the EMA takes that value instead of g. optim.grad_clip
    (> 0) stays a hard cap on top, and is the clip during the warmup."""

    alpha: float = 0.97  # EMA factor of the mean and variance of the grad norm
    z_threshold: float = 2.5  # a norm more than this many EMA stds above the EMA mean is clipped
    warmup: int = 25  # applied steps whose grad norms initialise the EMA (mean and variance)


@dataclass
class AdaGCConfig:
    """optim.clip_mode=adagc (AdaGC, arXiv:2502.11034; defaults are those of the authors'
    PyTorch code, github.com/lishuai-97/AdaGC): each parameter tensor's gradient is clipped to
    ratio x gamma, gamma the EMA of that tensor's clipped grad norm (norms over all shards).
    During the first ``warmup`` steps every gradient is clipped by the global norm to
    optim.grad_clip instead, and gamma starts at the smallest clipped norm of each tensor."""

    ratio: float = 1.04  # lambda_rel: a tensor's norm is clipped to ratio x its EMA
    beta: float = 0.99  # EMA factor of each tensor's clipped grad norm
    warmup: int = 100  # applied steps of global-norm clipping before the per-tensor rule


@dataclass
class SkipStepConfig:
    """Skip an update whose loss or grad norm spikes (OLMo-core's skip-step AdamW; defaults as
    there), decided on the device without a host sync. See docs/training.md, "Spike defenses"."""

    enabled: bool = False  # the paper configs turn it on
    window: int = 128  # statistics over the loss and grad norm of the last N applied steps
    z_threshold: float = 6.0  # skip when loss or grad norm > mean + z_threshold x std (n - 1)
    min_history: int = 64  # applied steps held before any skip (OLMo-core: max(20, window / 2))
    # After this many spikes skipped in a row, the next spike is applied and the window starts
    # over: the weights do not change while steps are skipped, so a longer streak means the
    # model (not its data) moved, and skipping cannot end it.
    max_in_row: int = 16


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Global grad-norm clip (0 disables); with clip_mode=zclip a hard cap on top of ZClip and its
    # clip during the warmup; with clip_mode=adagc the clip of AdaGC's warmup (its lambda_abs).
    grad_clip: float = 1.0
    clip_mode: ClipMode = ClipMode.global_norm
    zclip: ZClipConfig = field(default_factory=ZClipConfig)  # read only when clip_mode=zclip
    adagc: AdaGCConfig = field(default_factory=AdaGCConfig)  # read only when clip_mode=adagc
    skip_step: SkipStepConfig = field(default_factory=SkipStepConfig)
    # Parameters whose name contains any of these substrings get no weight decay. Default:
    # norms, biases, embeddings, and the head-mixing matrices that start at the identity (KHA,
    # MEA's hlc_k/hlc_v, talking heads' logit_mix/weight_mix): decay would pull them toward
    # zero instead of toward their identity start.
    no_decay: list[str] = field(
        default_factory=lambda: ["norm", "bias", "embed", "kha", "hlc", "_mix"]
    )
    implementation: str = "auto"  # auto (fused on CUDA, foreach on CPU) | fused | foreach


class ScheduleKind(enum.StrEnum):
    cosine = "cosine"  # linear warmup, cosine from lr to min_lr_ratio * lr
    constant = "constant"  # linear warmup, then lr
    wsd = "wsd"  # warmup, stable at lr, linear decay to min_lr_ratio * lr over decay_fraction


@dataclass
class ScheduleConfig:
    kind: ScheduleKind = ScheduleKind.cosine
    warmup_fraction: float = 0.05  # of train.max_steps (the paper: 5%)
    warmup_steps: int | None = None  # overrides warmup_fraction when set
    min_lr_ratio: float = 0.1  # final lr as a fraction of peak (the paper: 10%)
    decay_fraction: float = 0.2  # wsd only: final fraction of steps spent decaying
