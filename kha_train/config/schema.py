"""The root of the schema: :class:`Config`, one field per section."""

from __future__ import annotations

from dataclasses import dataclass, field

from kha_train.config.checkpoint import CheckpointConfig
from kha_train.config.data import DataConfig
from kha_train.config.evaluation import EvalConfig
from kha_train.config.model import ModelConfig
from kha_train.config.monitoring import LoggingConfig
from kha_train.config.optim import OptimConfig, ScheduleConfig
from kha_train.config.parallel import ParallelConfig
from kha_train.config.train import TrainConfig


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
