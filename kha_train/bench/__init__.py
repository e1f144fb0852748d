"""GPU throughput benchmark of full training steps (``kha-train bench``, ``scripts/bench.py``).

    settings.py   BenchSettings, and the trainer's parallel settings they stand for
    workload.py   what is timed: the trainer's model, optimizer and step on random tokens
    timing.py     warm-up, no-sync check, CUDA-event timing, tokens/s, MFU, memory
    profile.py    the profiler's breakdown of a step's GPU time by category
    cli.py        presets, the command line, running the variants and printing the table

Importing the package loads only ``settings`` and ``cli`` (no torch), so the CLI stays quick;
import the other modules by name.
"""

from kha_train.bench.cli import PRESETS, add_commands, build_arg_parser, main, preset_config, run
from kha_train.bench.settings import BenchSettings

__all__ = [
    "PRESETS",
    "BenchSettings",
    "add_commands",
    "build_arg_parser",
    "main",
    "preset_config",
    "run",
]
