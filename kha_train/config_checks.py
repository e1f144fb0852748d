"""Cross-field checks of a run config, run before anything is built (see kha_train/config.py).

``validate`` collects every problem into one :class:`ConfigError`, each naming the keys involved
and the fix.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re

from kha_train.config import (
    ACMode,
    AttentionKind,
    AttnBackend,
    Config,
    ConfigError,
    Fp8Recipe,
    KHAVariant,
    ModelConfig,
    OptimConfig,
    Precision,
)

# The largest optim.lr accepted: AdamW's step is about lr per weight, so anything near 1 already
# wrecks a model; far above it (1e38) the update overflows inside the optimizer kernel.
MAX_LR = 1.0
FLASH_ATTN_MISSING = (
    "model.attn_backend=flash_attn needs the flash-attn package, which is not installed: "
    "pip install 'kha-train[flash]' (it compiles against your torch and CUDA), or choose "
    "model.attn_backend=auto or cudnn (as fast on H100/H200)"
)


SKIP_RANGE = re.compile(r"^\s*(steps|samples)\s*:\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_skip_range(spec: str) -> tuple[str, int, int]:
    """``data.skip_ranges`` entry -> (kind, first, last): kind ``steps`` (1-based) or
    ``samples`` (global sample indices), both bounds inclusive. Raises :class:`ConfigError`."""
    m = SKIP_RANGE.match(str(spec))
    if m is None:
        raise ConfigError(
            f"data.skip_ranges entry {spec!r} is not steps:FIRST-LAST or samples:FIRST-LAST "
            "(inclusive; e.g. steps:1200-1260, samples:10000-10499, steps:1200)"
        )
    kind, first = m.group(1), int(m.group(2))
    last = int(m.group(3)) if m.group(3) is not None else first
    if last < first or (kind == "steps" and first < 1):
        raise ConfigError(
            f"data.skip_ranges entry {spec!r}: FIRST must be <= LAST"
            + (" and steps count from 1" if kind == "steps" else "")
        )
    return kind, first, last


def validate_model(m: ModelConfig) -> list[str]:
    errs = []
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    ):
        if getattr(m, name) <= 0:
            errs.append(f"model.{name} must be positive, got {getattr(m, name)}")
    if errs:
        return errs
    if m.num_heads % m.num_kv_heads:
        errs.append(
            f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} "
            "(GQA groups whole query heads per KV head; use 1 for MQA or num_heads for MHA)"
        )
    if m.head_dim % 2:
        errs.append(f"model.head_dim={m.head_dim} must be even for RoPE")
    if m.num_heads * m.head_dim != m.hidden_size and m.head_dim * m.num_heads < 16:
        errs.append("model.num_heads * model.head_dim is too small")
    for name in ("init_std", "norm_eps", "rope_theta"):
        if not _positive_finite(getattr(m, name)):
            errs.append(f"model.{name} must be a positive finite number, got {getattr(m, name)}")
    if not 0 < m.norm_eps < 1:
        errs.append(f"model.norm_eps={m.norm_eps} must be in (0, 1) (typical: 1e-6)")
    moe = m.moe
    if moe.num_experts < 0:
        errs.append(f"model.moe.num_experts must be >= 0, got {moe.num_experts}")
    elif moe.num_experts > 0:
        if not 1 <= moe.top_k <= moe.num_experts:
            errs.append(
                f"model.moe.top_k={moe.top_k} must be in [1, model.moe.num_experts={moe.num_experts}]"
            )
        if moe.expert_ffn_size <= 0:
            errs.append("model.moe.expert_ffn_size must be positive for an MoE model")
        if moe.moe_every_n < 1:
            errs.append(f"model.moe.moe_every_n must be >= 1, got {moe.moe_every_n}")
        elif not any(moe.is_moe_layer(i) for i in range(m.num_layers)):
            errs.append(
                "no layer is MoE: model.moe.first_k_dense / moe_every_n leave every one of the "
                f"{m.num_layers} layers dense (set model.moe.num_experts=0 for a dense model)"
            )
        if moe.num_shared_experts < 0:
            errs.append("model.moe.num_shared_experts must be >= 0")
        for name in ("bias_update_rate", "aux_loss_coef"):
            if not _nonnegative_finite(getattr(moe, name)):
                errs.append(f"model.moe.{name} must be >= 0 and finite, got {getattr(moe, name)}")
    dense_layers = (
        m.num_layers
        if moe.num_experts == 0
        else sum(not moe.is_moe_layer(i) for i in range(m.num_layers))
    )
    if dense_layers and m.ffn_size <= 0:
        errs.append(f"model.ffn_size must be positive: {dense_layers} layer(s) use the dense FFN")
    kha = m.kha
    if kha.variant != KHAVariant.none:
        bad = [t for t in kha.targets if t not in ("q", "k", "v")]
        if bad or not kha.targets:
            errs.append(
                f"model.kha.targets={list(kha.targets)} must be a non-empty subset of ['q', 'k', 'v']"
            )
        elif len(set(kha.targets)) != len(kha.targets):
            errs.append(f"model.kha.targets={list(kha.targets)} lists a target twice")
        if kha.variant == KHAVariant.gate and list(kha.targets) != ["v"]:
            errs.append(
                "model.kha.variant=gate is the paper's value-only ablation: set model.kha.targets=[v]"
            )
    return errs + _validate_attention_variant(m)


def _validate_attention_variant(m: ModelConfig) -> list[str]:
    """Checks of model.attention against the fields the variant reads (model.mla, model.mea)."""
    errs = []
    kind = AttentionKind(m.attention)
    if kind == AttentionKind.mla:
        mla = m.mla
        if mla.kv_lora_rank < 1 or mla.q_lora_rank < 0:
            errs.append(
                f"model.mla.kv_lora_rank must be >= 1 and model.mla.q_lora_rank >= 0 (0: no query "
                f"compression), got {mla.kv_lora_rank} and {mla.q_lora_rank}"
            )
        if mla.rope_head_dim < 2 or mla.rope_head_dim % 2:
            errs.append(
                f"model.mla.rope_head_dim={mla.rope_head_dim} must be even and >= 2 for RoPE"
            )
        if m.kha.variant not in (KHAVariant.none, KHAVariant.linear):
            errs.append(
                f"model.kha.variant={KHAVariant(m.kha.variant).value} with model.attention=mla: "
                "MLA only works with KHA-Linear (the paper, section 4.2.3: MLA never materialises per-head "
                "keys and values at inference, so only a linear transform can be folded into its "
                "up-projections): set model.kha.variant=linear"
            )
        if m.qk_norm:
            errs.append(
                "model.qk_norm=true with model.attention=mla: MLA normalises its latents instead, "
                "and a per-head norm on the up-projected keys would stop W^UK being folded into "
                "the queries at inference: set model.qk_norm=false"
            )
    elif kind == AttentionKind.gta and m.head_dim % 4:
        errs.append(
            f"model.head_dim={m.head_dim} must be a multiple of 4 for model.attention=gta "
            "(RoPE rotates pairs in the half of each key that is the shared RoPE head)"
        )
    elif kind == AttentionKind.talking_heads and m.attn_backend not in (
        AttnBackend.auto,
        AttnBackend.math,
    ):
        errs.append(
            f"model.attn_backend={AttnBackend(m.attn_backend).value} with "
            "model.attention=talking_heads: talking heads mixes the materialised attention map, which no fused kernel "
            "provides: set model.attn_backend=math (or auto)"
        )
    cached = m.mea.cached_kv_heads
    if kind == AttentionKind.mea and not 0 <= cached <= m.num_kv_heads:
        errs.append(
            f"model.mea.cached_kv_heads={cached} must be in [0, model.num_kv_heads="
            f"{m.num_kv_heads}] (0: all of them; fewer: virtual heads expanded by HLC)"
        )
    elif kind != AttentionKind.mea and cached:
        errs.append(
            f"model.mea.cached_kv_heads={cached} is set but model.attention={kind.value}: set "
            "model.attention=mea, or remove model.mea.cached_kv_heads"
        )
    return errs


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Cross-field checks, run before anything is built. Raises one :class:`ConfigError` listing
    every problem found."""
    errs = validate_model(cfg.model)
    if cfg.model.attn_backend == AttnBackend.flash_attn and not importlib.util.find_spec(
        "flash_attn"
    ):
        errs.append(FLASH_ATTN_MISSING)
    d, t, o, s, p, c = cfg.data, cfg.train, cfg.optim, cfg.schedule, cfg.parallel, cfg.checkpoint
    if d.seq_len <= 0:
        errs.append(f"data.seq_len must be positive, got {d.seq_len}")
    if t.micro_batch_size <= 0:
        errs.append(f"train.micro_batch_size must be positive, got {t.micro_batch_size}")
    if d.seq_len > 0 and t.micro_batch_size > 0:
        per_micro = t.micro_batch_size * d.seq_len * world_size
        if t.global_batch_tokens <= 0 or t.global_batch_tokens % per_micro:
            errs.append(
                f"train.global_batch_tokens={t.global_batch_tokens} must be a positive multiple of "
                f"micro_batch_size x seq_len x ranks = {t.micro_batch_size} x {d.seq_len} x "
                f"{world_size} = {per_micro}; e.g. train.global_batch_tokens="
                f"{max(1, round(t.global_batch_tokens / per_micro)) * per_micro}"
            )
    if (t.max_steps is None) == (t.total_tokens is None):
        errs.append(
            "set exactly one of train.max_steps and train.total_tokens "
            f"(got max_steps={t.max_steps}, total_tokens={t.total_tokens})"
        )
    elif t.max_steps is not None and t.max_steps <= 0:
        errs.append(f"train.max_steps must be positive, got {t.max_steps}")
    elif (
        t.total_tokens is not None
        and t.global_batch_tokens > 0
        and t.total_tokens < t.global_batch_tokens
    ):
        errs.append("train.total_tokens is less than one global batch (train.global_batch_tokens)")
    if t.device not in ("auto", "cuda", "cpu"):
        errs.append(f"train.device must be auto, cuda or cpu, got {t.device!r}")
    errs += _optim_errors(o)
    if o.implementation not in ("auto", "fused", "foreach"):
        errs.append(
            f"optim.implementation must be auto, fused or foreach, got {o.implementation!r}"
        )
    if (
        not 0 <= s.warmup_fraction < 1
        or not 0 <= s.min_lr_ratio <= 1
        or not 0 <= s.decay_fraction <= 1
    ):
        errs.append(
            "schedule.warmup_fraction must be in [0, 1), min_lr_ratio and decay_fraction in [0, 1]"
        )
    if p.dp_replicate < 1:
        errs.append(f"parallel.dp_replicate must be >= 1, got {p.dp_replicate}")
    elif p.dp_shard == -1:
        if world_size % p.dp_replicate:
            errs.append(
                f"parallel.dp_replicate={p.dp_replicate} must divide the number of ranks {world_size}"
            )
    elif p.dp_replicate * p.dp_shard != world_size:
        errs.append(
            f"parallel.dp_replicate x dp_shard = {p.dp_replicate} x {p.dp_shard} must equal the "
            f"number of ranks {world_size} (or set parallel.dp_shard=-1)"
        )
    if p.single_device and world_size > 1:
        errs.append(
            f"parallel.single_device=true runs one process without FSDP2, but {world_size} "
            "ranks were started: drop it, or run one process"
        )
    if p.single_device and t.precision == Precision.fp32:
        errs.append(
            "parallel.single_device=true keeps fp32 master weights under bf16 ones: it needs "
            "train.precision bf16 or fp8, not fp32"
        )
    if p.activation_checkpointing == ACMode.every_n and p.ac_every_n < 1:
        errs.append("parallel.ac_every_n must be >= 1")
    if c.keep_last < 1 or c.every_steps < 0:
        errs.append("checkpoint.keep_last must be >= 1 and checkpoint.every_steps >= 0")
    if cfg.logging.log_every < 1:
        errs.append("logging.log_every must be >= 1")
    if cfg.logging.spikes.window < 2 or not _positive_finite(cfg.logging.spikes.z_threshold):
        errs.append("logging.spikes.window must be >= 2 and z_threshold > 0")
    if cfg.logging.spikes.warmup < 0:
        errs.append(f"logging.spikes.warmup must be >= 0, got {cfg.logging.spikes.warmup}")
    errs += _spike_explain_errors(cfg)
    peak = cfg.logging.peak_tflops
    if peak is not None and not _positive_finite(peak):
        errs.append(f"logging.peak_tflops must be a positive number of TFLOP/s, got {peak}")
    errs += _train_loop_errors(cfg)
    errs += _eval_errors(cfg)
    errs += _fp8_errors(cfg)
    errs += loss_kernel_errors(cfg.parallel.loss_kernel, cfg.train.device)
    if errs:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errs))
    return cfg


def _positive_finite(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _nonnegative_finite(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _optim_errors(o: OptimConfig) -> list[str]:
    """optim.*: every value where AdamW is defined and cannot overflow."""
    errs = []
    if not (_positive_finite(o.lr) and o.lr <= MAX_LR):
        errs.append(
            f"optim.lr={o.lr} must be in (0, {MAX_LR}]: AdamW moves every weight by about lr "
            "per step, so a larger value only destroys the model (typical peak: 1e-4 to 3e-3)"
        )
    if not _nonnegative_finite(o.weight_decay) or not _nonnegative_finite(o.grad_clip):
        errs.append(
            f"optim.weight_decay and optim.grad_clip must be >= 0 and finite, got "
            f"{o.weight_decay} and {o.grad_clip} (grad_clip=0 turns clipping off)"
        )
    if not (0 <= o.beta1 < 1 and 0 < o.beta2 < 1):
        errs.append(
            f"optim.beta1 must be in [0, 1) and optim.beta2 in (0, 1), got {o.beta1}/{o.beta2}"
        )
    if not (_positive_finite(o.eps) and o.eps < 1):
        errs.append(f"optim.eps={o.eps} must be in (0, 1) (typical: 1e-8)")
    return errs + _spike_defense_errors(o)


def _spike_defense_errors(o: OptimConfig) -> list[str]:
    """optim.zclip, optim.adagc (checked whatever optim.clip_mode is) and optim.skip_step."""
    errs = []
    z, a, s = o.zclip, o.adagc, o.skip_step
    if not (0 < z.alpha < 1 and _positive_finite(z.z_threshold) and z.warmup >= 2):
        errs.append(
            f"optim.zclip.alpha must be in (0, 1), z_threshold > 0 and warmup >= 2 (its steps "
            f"give the first mean and variance), got {z.alpha}, {z.z_threshold} and {z.warmup} "
            "(ZClip's defaults: 0.97, 2.5, 25)"
        )
    if not (math.isfinite(a.ratio) and a.ratio >= 1 and 0 <= a.beta < 1 and a.warmup >= 1):
        errs.append(
            f"optim.adagc.ratio must be >= 1 (below 1 every tensor's gradient would shrink step "
            f"after step), beta in [0, 1) and warmup >= 1, got {a.ratio}, {a.beta} and "
            f"{a.warmup} (AdaGC's defaults: 1.04, 0.99, 100)"
        )
    if s.window < 2 or not _positive_finite(s.z_threshold):
        errs.append(
            f"optim.skip_step.window must be >= 2 and z_threshold > 0, got {s.window} and "
            f"{s.z_threshold}"
        )
    elif not 2 <= s.min_history <= s.window:
        errs.append(
            f"optim.skip_step.min_history={s.min_history} must be in [2, optim.skip_step.window="
            f"{s.window}]: a standard deviation needs 2 values, the window holds {s.window}"
        )
    if s.max_in_row < 1:
        errs.append(f"optim.skip_step.max_in_row must be >= 1, got {s.max_in_row}")
    return errs


def _eval_errors(cfg: Config) -> list[str]:
    """eval.*: counters and the window (the texts are checked when the trainer reads them)."""
    e, errs = cfg.eval, []
    if e.every < 0 or e.max_tokens < 1:
        errs.append(
            f"eval.every must be >= 0 (0: at the end only) and eval.max_tokens >= 1, got "
            f"{e.every} and {e.max_tokens}"
        )
    window = e.window if e.window is not None else cfg.data.seq_len
    stride = e.stride if e.stride is not None else window // 2
    if window < 2 or not 1 <= stride < window:
        errs.append(
            f"eval.window={window} must be >= 2 and eval.stride={stride} in [1, window): windows "
            "must overlap by at least one token"
        )
    if e.batch_rows is not None and e.batch_rows < 1:
        errs.append(f"eval.batch_rows must be >= 1, got {e.batch_rows}")
    for name, text in e.sets.items():
        if not name or "/" in name or not str(text).strip():
            errs.append(
                f"eval.sets.{name}={text!r}: a set needs a name without '/' (it becomes "
                "eval/<name>/loss) and a path"
            )
    return errs


def _spike_explain_errors(cfg: Config) -> list[str]:
    """logging.spikes.explain_*: how many spikes get their samples scored and decoded."""
    sp, errs = cfg.logging.spikes, []
    for key in ("explain_top", "explain_max", "explain_chars"):
        if getattr(sp, key) < 0:
            errs.append(f"logging.spikes.{key} must be >= 0, got {getattr(sp, key)}")
    if sp.explain_samples < 1:
        errs.append(
            f"logging.spikes.explain_samples must be >= 1, got {sp.explain_samples} (to explain "
            "no spike, set logging.spikes.explain_top=0)"
        )
    return errs


def _train_loop_errors(cfg: Config) -> list[str]:
    """train.* / data.* counters of the loop."""
    errs = []
    t, d = cfg.train, cfg.data
    if t.val_every < 0:
        errs.append(
            f"train.val_every must be >= 0 (0: validate at the end only), got {t.val_every}"
        )
    if t.val_batches < 0 or (t.val_batches == 0 and t.val_every > 0):
        errs.append(
            f"train.val_batches={t.val_batches} with train.val_every={t.val_every}: validation "
            "needs at least one micro-batch (set train.val_batches >= 1, or train.val_batches=0 "
            "with train.val_every=0 to turn validation off)"
        )
    if t.max_nonfinite_in_row < 1:
        errs.append(f"train.max_nonfinite_in_row must be >= 1, got {t.max_nonfinite_in_row}")
    if t.seed < 0 or d.seed < 0:
        errs.append(f"train.seed and data.seed must be >= 0, got {t.seed} and {d.seed}")
    if d.prefetch < 0:
        errs.append(f"data.prefetch must be >= 0 (0: synchronous), got {d.prefetch}")
    ws = cfg.schedule.warmup_steps
    if ws is not None and ws < 0:
        errs.append(f"schedule.warmup_steps must be >= 0, got {ws}")
    for spec in d.skip_ranges:
        try:
            parse_skip_range(spec)
        except ConfigError as e:
            errs.append(str(e))
    return errs + _rollback_errors(cfg)


def _rollback_errors(cfg: Config) -> list[str]:
    """train.rollback.*: ranges (checked whether it is on or not), and what it needs when on."""
    r, errs = cfg.train.rollback, []
    if r.max_spikes < 0 or r.window < 1:
        errs.append(
            f"train.rollback.max_spikes must be >= 0 (0: off) and window >= 1, got "
            f"{r.max_spikes} and {r.window}"
        )
    elif r.max_spikes > r.window:
        errs.append(
            f"train.rollback.max_spikes={r.max_spikes} can never be reached within "
            f"train.rollback.window={r.window} steps: lower it or widen the window"
        )
    if not (_nonnegative_finite(r.loss_rise) and 0 <= r.loss_smoothing < 1):
        errs.append(
            f"train.rollback.loss_rise must be >= 0 (a fraction; 0: off) and loss_smoothing in "
            f"[0, 1), got {r.loss_rise} and {r.loss_smoothing}"
        )
    if r.loss_rise_steps < 1 or r.loss_rise_warmup < 0:
        errs.append(
            f"train.rollback.loss_rise_steps must be >= 1 and loss_rise_warmup >= 0, got "
            f"{r.loss_rise_steps} and {r.loss_rise_warmup}"
        )
    if r.skip_margin < 0 or r.lr_steps < 0 or r.max_rollbacks < 0:
        errs.append(
            f"train.rollback.skip_margin, lr_steps and max_rollbacks must be >= 0, got "
            f"{r.skip_margin}, {r.lr_steps} and {r.max_rollbacks}"
        )
    if not (math.isfinite(r.lr_factor) and 0 < r.lr_factor <= 1):
        errs.append(
            f"train.rollback.lr_factor={r.lr_factor} must be in (0, 1] (1: the schedule's lr)"
        )
    if r.enabled:
        if r.max_spikes == 0 and r.loss_rise == 0:
            errs.append(
                "train.rollback.enabled=true but both triggers are off: set "
                "train.rollback.max_spikes > 0 and/or train.rollback.loss_rise > 0"
            )
        if cfg.checkpoint.every_steps == 0:
            errs.append(
                "train.rollback.enabled=true needs checkpoints to roll back to: set "
                "checkpoint.every_steps > 0"
            )
    return errs


# FP8 training (train.precision=fp8, training/fp8.py): torchao's float8 training, in the API of
# torchao 0.18, and FP8 tensor cores (compute capability 8.9: Ada; 9.0: Hopper; 10.0: Blackwell).
FP8_MIN_TORCHAO = (0, 18)
FP8_MIN_CAPABILITY = (8, 9)


def _fp8_errors(cfg: Config) -> list[str]:
    """parallel.fp8.* (checked whatever the precision), and what train.precision=fp8 needs."""
    f, errs = cfg.parallel.fp8, []
    if f.min_dim < 16:
        errs.append(
            f"parallel.fp8.min_dim={f.min_dim} must be >= 16 (FP8 GEMMs need dimensions that are "
            "multiples of 16; below ~1024 they are slower than bf16)"
        )
    if f.fsdp_fp8_all_gather and Fp8Recipe(f.recipe) != Fp8Recipe.tensorwise:
        errs.append(
            f"parallel.fp8.fsdp_fp8_all_gather=true needs parallel.fp8.recipe=tensorwise (one "
            f"scale per weight), got {Fp8Recipe(f.recipe).value}: set one of them differently"
        )
    if cfg.train.precision == Precision.fp8:
        errs += fp8_support_errors(cfg.train.device, f.emulate)
    return errs


def fp8_support_errors(device: str = "auto", emulate: bool = False) -> list[str]:
    """Why train.precision=fp8 cannot run here on ``device`` (train.device: auto, cuda or cpu);
    [] when it can. Checks that torchao >= 0.18 is installed and, unless ``emulate``, that the
    CUDA device this process would use has FP8 tensor cores. Imports torch only when asked about
    a GPU, and allocates nothing on it."""
    errs = []
    if importlib.util.find_spec("torchao") is None:
        errs.append(
            "train.precision=fp8 needs torchao >= 0.18, which is not installed: pip install "
            "'kha-train[fp8]' (or use train.precision=bf16)"
        )
    else:
        version = _version_tuple(importlib.metadata.version("torchao"))
        if version < FP8_MIN_TORCHAO:
            errs.append(
                f"train.precision=fp8 needs torchao >= 0.18, found "
                f"{importlib.metadata.version('torchao')}: pip install -U 'kha-train[fp8]'"
            )
    if emulate:
        return errs
    fix = (
        "use train.precision=bf16, or parallel.fp8.emulate=true to check the FP8 numerics "
        "without FP8 hardware (no speed-up)"
    )
    if device == "cpu":
        return [*errs, f"train.precision=fp8 runs FP8 GEMMs on a GPU, but train.device=cpu: {fix}"]
    import torch

    if not torch.cuda.is_available():
        return [*errs, f"train.precision=fp8 needs a CUDA GPU and none is visible: {fix}"]
    index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < FP8_MIN_CAPABILITY:
        errs.append(
            f"train.precision=fp8 needs FP8 tensor cores (compute capability >= 8.9: Ada, "
            f"Hopper, Blackwell), but {torch.cuda.get_device_name(index)} has {major}.{minor}: "
            f"{fix}"
        )
    return errs


# parallel.loss_kernel (model/loss_kernels.py) -> (module it imports, pip requirement).
LOSS_KERNEL_REQUIREMENTS = {
    "liger": ("liger_kernel", "liger-kernel>=0.8.5"),
    "cce": ("cut_cross_entropy", "cut-cross-entropy>=25.1.1"),
}


def loss_kernel_errors(kernel: str, device: str = "auto") -> list[str]:
    """Why parallel.loss_kernel cannot run here (train.device auto, cuda or cpu); [] when it
    can. The fused kernels are Triton kernels from the `fast` extra: CUDA only."""
    if kernel not in LOSS_KERNEL_REQUIREMENTS:
        return []
    module, requirement = LOSS_KERNEL_REQUIREMENTS[kernel]
    errs = []
    if importlib.util.find_spec(module) is None:
        errs.append(
            f"parallel.loss_kernel={kernel} needs {requirement}, which is not installed: pip "
            "install 'kha-train[fast]' (or use parallel.loss_kernel=chunked)"
        )
    fix = "use parallel.loss_kernel=chunked (ours, any device)"
    if device == "cpu":
        errs.append(f"parallel.loss_kernel={kernel} is a CUDA kernel, but train.device=cpu: {fix}")
    else:
        import torch

        if not torch.cuda.is_available():
            errs.append(
                f"parallel.loss_kernel={kernel} is a CUDA kernel and no GPU is visible: {fix}"
            )
    return errs


def _version_tuple(version: str) -> tuple[int, ...]:
    """'0.18.0+cu130' -> (0, 18, 0); parts that are not numbers end it."""
    out = []
    for part in re.split(r"[.+]", version):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def total_steps(cfg: Config) -> int:
    """Optimizer steps of the run (from max_steps or total_tokens)."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    assert cfg.train.total_tokens is not None
    return cfg.train.total_tokens // cfg.train.global_batch_tokens
