"""Command-line arguments the model tools share (argparse only: `kha-train --help` imports this).

A model tool reads weights from a run directory, a trainer checkpoint or a weights file
(tools/weights_io.py), takes ``key=value`` overrides of the run config right after them, and
runs on a device of the user's choice.
"""

from __future__ import annotations

import argparse

# What each kind of source means, for the tools that take a run directory too and those that
# take a checkpoint or a file only.
RUN_SOURCE_HELP = (
    "a run directory (its newest complete checkpoint), a trainer checkpoint folder "
    "(step_XXXXXXX), or a .safetensors / .pt state-dict file (then give --config)"
)
CHECKPOINT_SOURCE_HELP = (
    "a trainer checkpoint folder (checkpoints/step_XXXXXXX, config read from its config.yaml), "
    "or a .safetensors / .pt state-dict file (then give --config)"
)


def add_source_arguments(
    parser: argparse.ArgumentParser,
    *,
    dest: str = "source",
    metavar: str | None = None,
    help: str = RUN_SOURCE_HELP,
    overrides: bool = True,
) -> None:
    """The weights to read (positional ``dest``), optional ``key=value`` overrides of their run
    config right after it, and ``--config`` for a weights file."""
    parser.add_argument(dest, metavar=metavar, help=help)
    if overrides:
        parser.add_argument(
            "overrides",
            nargs="*",
            help=f"key=value overrides of the run config right after {metavar or dest.upper()}, "
            "e.g. data.dataset=DIR train.micro_batch_size=1",
        )
    parser.add_argument("--config", help="run config YAML of the weights (required for files)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda if available) | cuda | cpu")
