"""The ``checkpoint`` section: when checkpoints are written, how many are kept, resuming."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <logging.run_dir>/checkpoints
    every_steps: int = 0  # save every N steps (0: only at the end); a final save always happens
    keep_last: int = 3  # keep the newest K complete checkpoints
    async_save: bool = False  # write in the background while training continues
    resume: str = "none"  # none | auto (newest complete checkpoint in dir) | a checkpoint path
    # Also write each checkpoint as a Hugging Face model (`kha-train export`, run in the
    # background on the CPU by rank 0) to <logging.run_dir>/hf/step_XXXXXXX; keeps keep_last.
    export_hf: bool = False
