"""Which GPU kernels a setting changes: two `kha-train bench --json` results (same workload, one
setting apart, e.g. ``--deterministic``), their per-step kernel times side by side, the largest
changes first. Kernels outside either run's top 40 show as absent.

    python scripts/kernel_diff.py plain.jsonl det.jsonl [--top 15]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path) -> dict:
    """The last successful, profiled result of a bench JSONL file."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "top_kernels" in r and "error" not in r]
    if not rows:
        raise SystemExit(f"{path}: no profiled result (run the bench without --no-profile)")
    return rows[-1]


def diff(a: dict, b: dict) -> list[tuple[str, float, float]]:
    """(kernel, ms per step in a, in b), largest absolute change first."""
    ka = {n: ms for n, ms, _ in a["top_kernels"]}
    kb = {n: ms for n, ms, _ in b["top_kernels"]}
    rows = [(n, ka.get(n, 0.0), kb.get(n, 0.0)) for n in {*ka, *kb}]
    return sorted(rows, key=lambda r: -abs(r[2] - r[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    a, b = load(args.a), load(args.b)
    print(f"step: {a['step_ms']:.1f} ms ({a['tokens_per_s']:.0f} tok/s) -> {b['step_ms']:.1f} ms "
          f"({b['tokens_per_s']:.0f} tok/s), x{b['tokens_per_s'] / a['tokens_per_s']:.3f}")  # fmt: skip
    print(f"{'ms/step a':>10} {'ms/step b':>10} {'change':>8}  kernel")
    for name, ma, mb in diff(a, b)[: args.top]:
        print(f"{ma:10.2f} {mb:10.2f} {mb - ma:+8.2f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
