"""The `kha-train` command line: parse arguments and hand off to the package that owns the command.

Each package registers its own subcommands (``add_commands(subparsers)`` in its ``commands.py``)
and imports its heavy modules only inside the handler, so ``kha-train --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kha_train import __version__
from kha_train.config import ConfigError

# The packages whose commands make up the CLI, in --help order.
COMMAND_MODULES = (
    "kha_train.training.commands",  # train
    "kha_train.data.commands",  # tokenizer train, data prepare
    "kha_train.model.commands",  # info
    "kha_train.export",  # export
    "kha_train.evaluate",  # eval
    "kha_train.bench",  # bench
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
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            # Only a command whose own module is absent is skipped; a missing dependency
            # inside it is a real error.
            if e.name is None or not name.startswith(e.name):
                raise
            continue
        module.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # Errors kha-train raises on purpose (bad config, bad data, bad checkpoint) carry a
        # message that names the problem and the fix: print it without a traceback.
        if isinstance(e, ConfigError) or type(e).__module__.startswith("kha_train"):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
