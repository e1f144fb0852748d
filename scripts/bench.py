#!/usr/bin/env python3
"""GPU throughput benchmark (see kha_train/bench/): `python scripts/bench.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kha_train.bench import build_arg_parser, main

if __name__ == "__main__":
    raise SystemExit(main(build_arg_parser().parse_args()))
