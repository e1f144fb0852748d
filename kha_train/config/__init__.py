"""The run configuration: one typed schema for every option, loaded through OmegaConf.

A run is described by a YAML file that may name a base file with ``extends:`` (resolved relative
to the file that names it), followed by command-line ``key=value`` overrides::

    kha-train train configs/tiny/kha_moe.yaml optim.lr=3e-4 train.max_steps=20

Every option is documented once, as the comment beside its field in the module of its section.
Loading rejects unknown keys (suggesting the closest valid names), wrong types and missing
required values, naming the full key path; :func:`validate` then runs the cross-field checks
before anything is built.

What lives where (every name below is imported from ``kha_train.config``):

- ``schema.py``: :class:`Config`, the root, one field per section;
- ``model.py``: ``model`` (attention kind and backend, KHA, MoE, MLA, MEA);
- ``data.py``: ``data``;
- ``optim.py``: ``optim`` (AdamW, clipping: ZClip, AdaGC; skipped steps) and ``schedule``;
- ``train.py``: ``train`` (length, batch, precision, spike rollbacks);
- ``parallel.py``: ``parallel`` (FSDP2 / HSDP, activation checkpointing, compile, FP8);
- ``checkpoint.py``: ``checkpoint``;
- ``monitoring.py``: ``logging`` (loggers, spike detection);
- ``evaluation.py``: ``eval`` (in-loop evaluation);
- ``errors.py``: :class:`ConfigError`;
- ``loading.py``: the loader: YAML + ``extends`` + overrides -> :class:`Config`
  (:func:`load_config`, :func:`build_config`) and back (:func:`to_yaml`, :func:`to_dict`,
  :func:`save_config`).

The cross-field checks are in ``kha_train/config_checks.py``, outside this package.
"""

from __future__ import annotations

from kha_train.config.checkpoint import CheckpointConfig
from kha_train.config.data import DataConfig
from kha_train.config.errors import ConfigError
from kha_train.config.evaluation import EvalConfig, EvalPick
from kha_train.config.loading import (
    EXCLUSIVE_KEYS,
    EXTENDS_KEY,
    build_config,
    load_config,
    save_config,
    to_dict,
    to_yaml,
)
from kha_train.config.model import (
    AttentionKind,
    AttnBackend,
    Balancing,
    KHAConfig,
    KHAVariant,
    MEAConfig,
    MLAConfig,
    ModelConfig,
    MoEConfig,
    ScoreFunc,
)
from kha_train.config.monitoring import LoggingConfig, SpikeConfig, WandbMode
from kha_train.config.optim import (
    AdaGCConfig,
    ClipMode,
    OptimConfig,
    ScheduleConfig,
    ScheduleKind,
    SkipStepConfig,
    ZClipConfig,
)
from kha_train.config.parallel import ACMode, Fp8Config, Fp8Recipe, LossKernel, ParallelConfig
from kha_train.config.schema import Config
from kha_train.config.train import Precision, RollbackConfig, TrainConfig

__all__ = [
    "EXCLUSIVE_KEYS",
    "EXTENDS_KEY",
    "ACMode",
    "AdaGCConfig",
    "AttentionKind",
    "AttnBackend",
    "Balancing",
    "CheckpointConfig",
    "ClipMode",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "EvalPick",
    "Fp8Config",
    "Fp8Recipe",
    "KHAConfig",
    "KHAVariant",
    "LoggingConfig",
    "LossKernel",
    "MEAConfig",
    "MLAConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "Precision",
    "RollbackConfig",
    "ScheduleConfig",
    "ScheduleKind",
    "ScoreFunc",
    "SkipStepConfig",
    "SpikeConfig",
    "TrainConfig",
    "WandbMode",
    "ZClipConfig",
    "build_config",
    "load_config",
    "save_config",
    "to_dict",
    "to_yaml",
]
