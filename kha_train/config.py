"""The run configuration: one typed schema for every option, loaded through OmegaConf.

A run is described by a YAML file that may name a base file with ``extends:`` (resolved relative
to the file that names it), followed by command-line ``key=value`` overrides::

    kha-train train configs/tiny/kha_moe.yaml optim.lr=3e-4 train.max_steps=20

Every option is documented once, as the comment beside its field below. Loading rejects unknown
keys (suggesting the closest valid names), wrong types and missing required values, naming the
full key path; :func:`validate` then runs the cross-field checks before anything is built.
"""

from __future__ import annotations

import difflib
import enum
import os
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

# omegaconf is imported lazily inside the loaders so `import kha_train.config` stays cheap and
# works where omegaconf is not installed (e.g. the GPU image, which builds configs directly).


class ConfigError(ValueError):
    """A config problem, with a message that names the key and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class AttnBackend(enum.StrEnum):
    auto = "auto"  # let PyTorch pick (cuDNN is first on Hopper)
    cudnn = "cudnn"  # SDPA cuDNN backend: fastest on H100 (8.1 ms vs 14.0 ms for flash)
    flash = "flash"  # SDPA flash backend
    efficient = "efficient"  # SDPA memory-efficient backend (no native GQA: K/V are expanded)
    math = "math"  # SDPA reference math backend (CPU tests)
    flash_attn = "flash_attn"  # the optional flash-attn package (pip install kha-train[flash])


class AttentionKind(enum.StrEnum):
    gqa = "gqa"  # MHA / GQA / MQA: set by num_kv_heads (= num_heads, divisor, 1)
    gta = "gta"  # grouped-tied: one KV projection per KV head (V = KV), one shared RoPE key
    mla = "mla"  # DeepSeek-V2 latent attention (model.mla); KHA-Linear only, qk_norm off
    mea = "mea"  # GQA + head-level composition of K/V across KV heads + head norm (model.mea)
    talking_heads = "talking_heads"  # GQA + H x H logit/weight mixing; materialised map, slow


class KHAVariant(enum.StrEnum):
    none = "none"  # plain attention
    linear = "linear"  # shared d_head x d_head matrix T per target (absorbable at inference)
    mlp = "mlp"  # 2 * (x W_up * sigmoid(x W_gate)) W_down per target; the paper uses V only
    gate = "gate"  # x * 2 sigmoid(x W_gate): the paper's ablation (hurts, Table 2)


class ScoreFunc(enum.StrEnum):
    softmax = "softmax"
    sigmoid = "sigmoid"


class Balancing(enum.StrEnum):
    none = "none"  # no balancing
    loss_free_sign = "loss_free_sign"  # b <- b - u * sign(F - 1/E)            (Wang et al. 2024)
    loss_free_rms = "loss_free_rms"  # b <- b - u * (F - 1/E) / RMS(F - 1/E)   (Su 2025; paper)
    aux_loss = "aux_loss"  # Switch-style auxiliary loss, coefficient aux_loss_coef


@dataclass
class MoEConfig:
    num_experts: int = 0  # routed experts; 0 makes every layer a dense SwiGLU FFN
    top_k: int = 0  # experts chosen per token
    expert_ffn_size: int = 0  # hidden size of each SwiGLU expert
    num_shared_experts: int = 0  # always-on experts of expert_ffn_size each (Qwen3: 0)
    first_k_dense: int = 0  # the first k layers use the dense FFN (model.ffn_size)
    moe_every_n: int = 1  # layer i (0-based) is MoE iff (i + 1) % moe_every_n == 0, after first_k
    score_func: ScoreFunc = ScoreFunc.softmax  # router score; softmax over experts in fp32
    norm_topk_prob: bool = True  # renormalise the top-k gate weights to sum to 1
    balancing: Balancing = Balancing.loss_free_rms
    bias_update_rate: float = 1e-3  # u in the loss-free rules, applied once per optimizer step
    aux_loss_coef: float = 1e-2  # weight of the Switch aux loss when balancing=aux_loss

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (0-based) uses the routed MoE FFN."""
        if self.num_experts == 0 or layer_idx < self.first_k_dense:
            return False
        return (layer_idx + 1) % self.moe_every_n == 0


@dataclass
class KHAConfig:
    variant: KHAVariant = KHAVariant.none
    # Which projections get a shared head transform: any of q, k, v. The paper's main setting is
    # mlp on [v]; gate is only defined on v.
    targets: list[str] = field(default_factory=lambda: ["v"])


@dataclass
class MLAConfig:
    """Multi-head latent attention (model.attention=mla). Content (no RoPE) part of each query /
    key head and each value head: model.head_dim; the cache holds kv_lora_rank + rope_head_dim."""

    kv_lora_rank: int = 512  # latent c_kv each token caches; K and V heads are up-projected from it
    q_lora_rank: int = 1024  # query latent size; 0: queries are projected from x directly
    rope_head_dim: int = 64  # decoupled RoPE part of q and k; the key's is one head shared by all


@dataclass
class MEAConfig:
    """Explicit multi-head attention (model.attention=mea, Peng et al. 2026)."""

    # KV heads projected (and cached); the HLC matrices expand them to model.num_kv_heads.
    # 0: as many as num_kv_heads (HLC is then a square mixing); fewer: MEA's "virtual heads".
    cached_kv_heads: int = 0
    head_norm: bool = True  # RMSNorm over d_head on each head's attention output before W^O


@dataclass
class ModelConfig:
    vocab_size: int = 151936  # embedding rows; >= the tokenizer's vocab (padding is allowed)
    hidden_size: int = 1152
    num_layers: int = 12
    num_heads: int = 32  # query heads
    num_kv_heads: int = 4  # key/value heads: num_heads -> MHA, 1 -> MQA, else GQA
    head_dim: int = 128
    ffn_size: int = 3072  # dense SwiGLU hidden size (dense models and dense layers of MoEs)
    tie_embeddings: bool = True  # LM head shares the input embedding matrix
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    qk_norm: bool = True  # per-head RMSNorm on q and k before RoPE (Qwen3)
    init_std: float = 0.02  # std of the normal init; output projections are scaled by depth
    attention: AttentionKind = AttentionKind.gqa
    attn_backend: AttnBackend = AttnBackend.auto
    moe: MoEConfig = field(default_factory=MoEConfig)
    kha: KHAConfig = field(default_factory=KHAConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)  # read only when attention=mla
    mea: MEAConfig = field(default_factory=MEAConfig)  # read only when attention=mea


# ----------------------------------------------------------------------------------------------
# Data, optimisation, training
# ----------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    dataset: str = "???"  # directory written by `kha-train data prepare` (holds index.json)
    seq_len: int = 2048  # tokens per sample; each sample reads seq_len + 1 tokens
    seed: int = 1234  # seed of the per-epoch shuffle of the global sample order
    tokenizer: str | None = None  # if set, its hash must match the dataset's (catches mixups)
    prefetch: int = 2  # micro-batches prepared ahead by a background thread (0: synchronous)
    # Train data never read: "steps:FIRST-LAST" (the batches optimizer steps FIRST..LAST, 1-based,
    # would take, counted from the run's data position when the range is first applied) or
    # "samples:FIRST-LAST" (global sample indices: positions in the shuffled global order,
    # docs/data.md); both inclusive, a single number for one step or sample. The loader state in
    # each checkpoint holds the resolved ranges (with those rollbacks add, train.rollback), so a
    # resume stays exact; the run's config.yaml lists them all as samples: ranges, so a rerun
    # from it reads the same data. Ranges already trained on cannot be added on a resume.
    skip_ranges: list[str] = field(default_factory=list)


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


@dataclass
class RollbackConfig:
    """Roll back to the last checkpoint before persistent spikes, skip their data and go on, in
    the same process, on every rank (training/rollback.py; docs/training.md, "Spike defenses").
    Triggers are evaluated at drains (logging steps, and before checkpoints), from the global
    per-step loss, grad norm and spike-guard verdicts, so every rank decides alike. With no
    checkpoint before the spike window, the trigger is logged (rollback_unavailable) and
    training goes on."""

    enabled: bool = False  # the paper configs turn it on
    # Trigger 1: at least max_spikes spiking steps among the last `window` steps. A spiking step
    # is non-finite, skipped or applied-after-a-streak by the spike guard (optim.skip_step), or
    # flagged by the logged detector (logging.spikes). 0: off.
    max_spikes: int = 8
    window: int = 128  # steps over which spiking steps are counted
    # Trigger 2: the smoothed loss (an EMA over applied steps) stays above (1 + loss_rise) x its
    # lowest value so far for loss_rise_steps applied steps in a row; the window then starts
    # after the step of that lowest value. A fraction (0.1: 10% above); 0: off.
    loss_rise: float = 0.0
    loss_rise_steps: int = 100  # K: applied steps in a row above the margin
    loss_smoothing: float = 0.99  # EMA factor of the smoothed loss (about 1 / (1 - x) steps)
    loss_rise_warmup: int = 1000  # applied steps before trigger 2 is armed (fast early descent)
    # What a rollback does: restore the newest checkpoint before the window's first step, skip
    # the batches of the window (its first step to the step that triggered) plus skip_margin
    # more global batches after them, and train on from the checkpoint's step.
    skip_margin: int = 0
    lr_factor: float = 1.0  # learning rate x this for lr_steps steps after each rollback
    lr_steps: int = 0  # 0: the schedule is unchanged
    # A trigger after this many rollbacks stops the run with an error (exit code != 0), leaving
    # every checkpoint in place. 0: stop at the first trigger (detect only).
    max_rollbacks: int = 3


class Precision(enum.StrEnum):
    bf16 = "bf16"  # bf16 compute, fp32 master weights, fp32 gradient reduction
    fp32 = "fp32"  # everything fp32 (CPU tests, exact-resume checks)
    # bf16 as above, with the GEMMs of the large dense projections in FP8 (torchao float8
    # training; parallel.fp8 says which and how). Needs torchao (pip install 'kha-train[fp8]')
    # and a GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell). Checkpoints are the same
    # as bf16's: a run can resume across bf16 and fp8.
    fp8 = "fp8"


@dataclass
class TrainConfig:
    global_batch_tokens: int = 65536  # tokens per optimizer step across all ranks
    micro_batch_size: int = 4  # samples per rank per forward/backward
    max_steps: int | None = None  # optimizer steps; exactly one of max_steps / total_tokens
    total_tokens: int | None = None  # training length in tokens (steps = total // batch)
    seed: int = 0  # model init and dropout-free RNG streams
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    precision: Precision = Precision.bf16
    val_every: int = 0  # validation every N steps (0: only at the end, if a val split exists)
    val_batches: int = 8  # micro-batches per validation pass (0 with val_every=0: no validation)
    max_nonfinite_in_row: int = 5  # abort after this many consecutive non-finite steps
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    # Bitwise-reproducible runs on one GPU type: torch's deterministic kernels, a fixed cuBLAS
    # workspace, no cuDNN autotuning (training/determinism.py; the cost: docs/training.md).
    deterministic: bool = False


class ACMode(enum.StrEnum):
    none = "none"
    full = "full"  # checkpoint every transformer block
    every_n = "every_n"  # checkpoint every ac_every_n-th block


class Fp8Recipe(enum.StrEnum):
    tensorwise = "tensorwise"  # one scale per tensor, cuBLAS FP8 GEMMs: the fastest
    rowwise = "rowwise"  # one scale per row, CUTLASS GEMMs: finer; slower than bf16 below 8192


@dataclass
class Fp8Config:
    """How train.precision=fp8 converts the model (training/fp8.py: torchao float8 training,
    applied by parallelize before activation checkpointing, compile and FSDP2). Converted: the
    nn.Linear projections inside the transformer blocks (attention's q/k/v/o and the other
    variants' projections, dense SwiGLU FFNs, shared experts) whose in and out features are both
    >= min_dim and multiples of 16. Never converted: the embedding, the LM head and loss, norms,
    the router, the KHA / MEA / talking-heads matrices and the routed experts (grouped GEMM)."""

    recipe: Fp8Recipe = Fp8Recipe.tensorwise  # how scales are taken (Fp8Recipe above)
    # Both dimensions at least this. 1024 converts q and o (hidden 1152 or 2048 x 4096) and
    # leaves k and v (x 512), as torchao's tensorwise heuristic would; FP8 gained 1.02-1.08x
    # at hidden 1152 and 1.23-1.31x at 2048 on an H200 (forward + backward of one GEMM).
    min_dim: int = 1024
    # FSDP2 all-gathers the converted weights in FP8 (half of bf16's bytes; tensorwise only),
    # their scales computed in one pass per step (training/step.py). Pays where parameters are
    # sharded; with one GPU there is nothing to gather. A projection whose weight has a KHA part
    # folded in (KHA-Linear's q/k/v, KHA-MLP on V's o) is gathered in bf16 still.
    fsdp_fp8_all_gather: bool = False
    # Cast to FP8 and back but multiply in high precision: runs on any device, no speed-up.
    # For CPU tests and numerics checks (skips the GPU check).
    emulate: bool = False


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # HSDP replicas (multi-node: number of nodes); 1 = plain FSDP
    dp_shard: int = -1  # ranks each replica shards over; -1 = world_size / dp_replicate
    activation_checkpointing: ACMode = ACMode.none
    ac_every_n: int = 2  # for activation_checkpointing=every_n
    # torch.compile each transformer block. null (auto): on with CUDA, where it pays (+50%
    # tokens/s on the paper's A0.44B MoE on one H200, docs/performance.md), off on CPU.
    compile: bool | None = None
    # On CUDA, torch.compile each LM-head + loss chunk (fuses its softmax passes,
    # docs/performance.md); false: eager (debugging, or where Inductor is unavailable).
    compile_loss: bool = True
    # FSDP2: free each block's gathered bf16 parameters after its forward and gather them again
    # for its backward (ZeRO-3: less memory, one more all-gather per block and micro-batch).
    # null: on when parameters are sharded, off when each rank's shard group is the rank alone
    # (one GPU, or dp_shard=1 replication), where the second "gather" is a copy that saves
    # only the bf16 copy's memory (2 bytes per parameter) at about 2% of the step's time.
    reshard_after_forward: bool | None = None
    # With several micro-batches per step: keep parameters gathered and gradients unsharded
    # (accumulated in fp32) until the last micro-batch, then reduce once. Saves one all-gather
    # and one reduce-scatter per micro-batch (+8.7% tokens/s on one H100, docs/performance.md);
    # costs a full-size fp32 gradient per rank. null: on when nothing is sharded (dp_shard 1:
    # one GPU, or pure replication), where it costs no memory.
    defer_grad_sync: bool | None = None
    fp8: Fp8Config = field(default_factory=Fp8Config)  # read only when train.precision=fp8


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <logging.run_dir>/checkpoints
    every_steps: int = 0  # save every N steps (0: only at the end); a final save always happens
    keep_last: int = 3  # keep the newest K complete checkpoints
    async_save: bool = False  # write in the background while training continues
    resume: str = "none"  # none | auto (newest complete checkpoint in dir) | a checkpoint path
    # Also write each checkpoint as a Hugging Face model (`kha-train export`, run in the
    # background on the CPU by rank 0) to <logging.run_dir>/hf/step_XXXXXXX; keeps keep_last.
    export_hf: bool = False


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


@dataclass
class EvalConfig:
    """In-loop evaluation (training/evaluator.py): loss and bits per byte of held-out texts,
    scored like `kha-train eval` (documents alone, long ones by a sliding window)."""

    # name -> text: raw text (.txt / .jsonl / .parquet, optionally .gz, a folder or a glob;
    # tokenized with the run's tokenizer) or a prepared dataset directory (its val split, which
    # must share the run's tokenizer). Logged as eval/<name>/loss and eval/<name>/bpb. {}: off.
    sets: dict[str, str] = field(default_factory=dict)
    every: int = 1000  # steps between evaluations (also one at the end); 0: only at the end
    max_tokens: int = 1_000_000  # per set: whole documents are read until this many tokens
    window: int | None = None  # tokens the model reads at once (default data.seq_len)
    stride: int | None = None  # tokens between sliding windows in [1, window) (default window/2)
    batch_rows: int | None = None  # windows per forward pass (default train.micro_batch_size)
    text_field: str = "text"  # column of .jsonl / .parquet sets


@dataclass
class Config:
    name: str = "run"  # run name: the run directory and the W&B run name
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

EXTENDS_KEY = "extends"


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file, merging it over the chain of files it ``extends``."""
    from omegaconf import OmegaConf

    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config files extend each other in a loop: {chain}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    base_name = raw.pop(EXTENDS_KEY, None)
    if base_name is None:
        return raw
    base = _read_yaml(path.parent / str(base_name), (*seen, path))
    return _deep_merge(base, _replace_exclusive(base, raw, str(path), []))


# Keys of which a config sets exactly one (the run's length). A layer (a file that extends
# another, or the command line) that sets one of them replaces the other: `train.max_steps=20`
# on a config with train.total_tokens just works.
EXCLUSIVE_KEYS = (("train", "max_steps", "total_tokens"),)


def _replace_exclusive(
    base: dict[str, Any], over: dict[str, Any], source: str, notes: list[str]
) -> dict[str, Any]:
    """``over`` with the other key of each exclusive pair set to null where ``over`` sets one
    key of it and ``base`` the other; ``notes`` gets one line per replacement."""
    out = dict(over)
    for section, *keys in EXCLUSIVE_KEYS:
        mine, theirs = over.get(section), base.get(section)
        if not isinstance(mine, dict) or not isinstance(theirs, dict):
            continue
        for key in keys:
            others = [k for k in keys if k != key]
            if mine.get(key) is None or any(k in mine for k in others):
                continue
            for other in others:
                if theirs.get(other) is not None:
                    notes.append(
                        f"{section}.{key}={mine[key]} ({source}) replaces "
                        f"{section}.{other}={theirs[other]}"
                    )
                    out[section] = {**out[section], other: None}
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _check_keys(node: Any, schema: type, prefix: str, source: str) -> None:
    """Reject unknown keys anywhere in ``node`` with the full path and close matches."""
    if not isinstance(node, dict):
        return
    by_name = {f.name: f for f in fields(schema)}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in by_name:
            close = difflib.get_close_matches(str(key), list(by_name), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
            valid = ", ".join(sorted(by_name))
            raise ConfigError(f"{source}: unknown key '{path}'.{hint} Valid keys here: {valid}.")
        sub = _dataclass_type(by_name[key].type, schema)
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: '{path}' is a section and needs a mapping of keys, got {value!r}."
                )
            _check_keys(value, sub, path + ".", source)


def _dataclass_type(annotation: Any, owner: type) -> type | None:
    """The dataclass a field holds, if any (annotations are strings under `from __future__`)."""
    if isinstance(annotation, str):
        annotation = globals().get(annotation, None)
    return annotation if isinstance(annotation, type) and is_dataclass(annotation) else None


def _overrides_to_dict(overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    for o in overrides:
        if "=" not in o:
            raise ConfigError(
                f"command-line override {o!r} is not key=value (e.g. optim.lr=3e-4 or train.max_steps=100)"
            )
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)  # type: ignore[return-value]
    except Exception as e:
        raise ConfigError(f"could not parse command-line overrides {overrides}: {e}") from e


def _format_omegaconf_error(e: Exception, source: str) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    where = f" at '{key}'" if key else ""
    return f"{source}: invalid value{where}: {msg}"


def build_config(layers: list[tuple[str, dict[str, Any]]]) -> Config:
    """Merge (source name, mapping) layers over the schema defaults into a typed :class:`Config`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    merged = OmegaConf.structured(Config)
    for source, layer in layers:
        _check_keys(layer, Config, "", source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_format_omegaconf_error(e, source)) from e
    missing = sorted(_missing_keys(merged))
    if missing:
        raise ConfigError(
            f"required value(s) missing: {', '.join(missing)}. Set them in the YAML file or on the "
            f"command line, e.g. {missing[0]}=..."
        )
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e, "config")) from e
    assert isinstance(cfg, Config)
    return cfg


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    out = []
    for key in node:
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            out.append(path)
        elif isinstance(node[key], DictConfig):
            out.extend(_missing_keys(node[key], path + "."))
    return out


def load_config(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    notes: list[str] | None = None,
) -> Config:
    """Load a YAML config (following ``extends``), apply ``key=value`` overrides, check types.

    An override of one of a pair of exclusive keys (:data:`EXCLUSIVE_KEYS`) replaces the other;
    each such replacement is appended to ``notes`` (or, without a list, printed to stderr by
    rank 0 as a ``note:`` line)."""
    layers = [(str(path), _read_yaml(Path(path)))]
    replaced: list[str] = []
    if overrides:
        cli = _overrides_to_dict(list(overrides))
        layers.append(
            ("command line", _replace_exclusive(layers[0][1], cli, "command line", replaced))
        )
    if notes is not None:
        notes.extend(replaced)
    elif replaced and os.environ.get("RANK", "0") == "0":
        for line in replaced:
            print(f"note: {line}", file=sys.stderr)
    return build_config(layers)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved with every run; loadable by :func:`load_config`)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def to_dict(cfg: Config) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
