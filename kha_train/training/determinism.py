"""``train.deterministic``: the same config on the same GPU type gives bitwise-equal runs.

Where the floating-point result depends on scheduling, not on the inputs (atomic adds in a
backward kernel, a cuBLAS split-K whose workspace differs between streams, cuDNN's choice by
timing), torch's deterministic mode picks the kernel that always sums in one order, or raises
naming the op that has none. kha-train's own code has no such op besides those: routing counts
are integer adds, the data order and initialisation are seeded, the loss sums per chunk in a
fixed order. What it costs in tokens/s, and which kernels change, is measured on the GPU
(docs/training.md, "Deterministic mode").

A resumed run equals the uninterrupted one with or without this mode on the CPU; on CUDA the
mode is what makes "bitwise" hold there too, and what ``kha-train replay`` relies on to tell a
spike the data causes from a transient one.
"""

from __future__ import annotations

import os

import torch

# cuBLAS keeps results reproducible only with a fixed workspace per handle (NVIDIA's cuBLAS docs,
# "Results reproducibility"): ":4096:8" is the larger of the two settings it names.
CUBLAS_WORKSPACE = ":4096:8"


def make_deterministic() -> None:
    """Switch this process to deterministic kernels (before any CUDA work: cuBLAS reads its
    workspace setting when its first handle is made)."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False  # no kernel choice by timing
