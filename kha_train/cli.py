"""The `kha-train` command line: parse arguments and hand off to the package that owns the command.

Each package registers its own subcommands (``add_commands(subparsers)`` in its ``commands.py``)
and imports its heavy modules only inside the handler, so ``kha-train --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

from kha_train import __version__, bench
from kha_train.config import ConfigError
from kha_train.data import commands as data_commands
from kha_train.fs import describe
from kha_train.tools import commands as tool_commands
from kha_train.training import commands as training_commands

# The packages whose commands make up the CLI, in --help order.
COMMAND_MODULES = (
    training_commands,  # train
    data_commands,  # tokenizer train, data prepare
    tool_commands,  # info, virtual-heads, export
    bench,  # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kha-train",
        description=(
            "Pretrain Mixture-of-Experts language models with knocking-heads attention. "
            "Commands that take a config accept `CONFIG.yaml [key=value ...]` overrides, "
            "e.g. `kha-train train configs/tiny/kha_moe.yaml optim.lr=3e-4`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kha-train {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(subparsers)
    return parser


# Commands whose arguments belong to another program: everything after the name is handed over.
PASSTHROUGH = {"lm-eval": ("kha_train.tools.lm_eval_model", "main")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH and argv[1:] not in (["-h"], ["--help"]):
        import importlib

        module, name = PASSTHROUGH[argv[0]]
        return int(getattr(importlib.import_module(module), name)(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # Errors kha-train raises on purpose (bad config, bad data, bad checkpoint) carry a
        # message that names the problem and the fix: print it without a traceback. So does a
        # filesystem fault on a named path (disk full, read-only, permissions).
        if isinstance(e, ConfigError) or type(e).__module__.startswith("kha_train"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OSError) and e.filename:
            print(f"error: {describe(e, 'use')}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
