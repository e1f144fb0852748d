"""``kha-train train``: the trainer as a CLI command (one process, or one rank under torchrun)."""

from __future__ import annotations

import argparse
from typing import TextIO


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description=(
            "Train the model of CONFIG on its dataset. Runs as one process here, or as every "
            "rank of a torchrun launch (`torchrun --nproc_per_node=N -m kha_train.train CONFIG "
            "...` is the same). Writes config.yaml, metrics.jsonl, spikes.jsonl, loss.png and "
            "checkpoints/ under logging.run_dir. SIGTERM or SIGUSR1: finish the step, save, exit 0. "
            "See docs/training.md."
        ),
    )
    p.add_argument("config", help="run config (YAML), e.g. configs/tiny/kha_moe.yaml")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. optim.lr=3e-4 train.max_steps=100 checkpoint.resume=auto",
    )
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    return run(args.config, args.overrides)


def run(config_path: str, overrides: list[str] | None = None, console: TextIO | None = None) -> int:
    """Load the config, train, tear down. The body of ``kha-train train`` and ``kha_train.train``."""
    from kha_train.training.device_memory import default_allocator_config

    default_allocator_config()  # before any CUDA work; the bench does the same
    from kha_train.config import load_config
    from kha_train.training import distributed as D
    from kha_train.training.trainer import Trainer

    cfg = load_config(config_path, overrides or [])
    trainer = None
    try:
        trainer = Trainer(cfg, console=console)
        return trainer.train()
    finally:
        if trainer is not None:
            trainer.close()
        D.teardown()
