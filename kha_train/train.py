"""Training entry point for torchrun (and plain python):

    torchrun --nproc_per_node=8 -m kha_train.train CONFIG.yaml [key=value ...]
    python -m kha_train.train CONFIG.yaml [key=value ...]

Same as ``kha-train train``; see docs/training.md.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from kha_train.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process group is destroyed by now. Skip the interpreter's teardown: gloo's
        # worker threads can still abort it ("terminate called without an active exception"),
        # which would turn a finished run into a failed exit code under torchrun.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
