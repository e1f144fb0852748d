"""The ``checkpoint`` section: when checkpoints are written, how many are kept, resuming."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <logging.run_dir>/checkpoints
    every_steps: int = 0  # save every N steps (0: only at the end); a final save always happens
    keep_last: int = 3  # keep the newest K complete checkpoints
    # Write in the background while training continues: training stalls only for the copy of
    # the state to host memory, into buffers kept for the run (pinned on a GPU: host memory the
    # size of this rank's checkpoint shard, model and optimizer).
    async_save: bool = False
    # Who writes an async save: "thread" (a thread of the training process) or "process" (a
    # writer process per rank, started at the first save and kept, reading the copy from shared
    # memory: the write does not compete with the training loop for the interpreter).
    async_mode: str = "thread"
    resume: str = "none"  # none | auto (newest complete checkpoint in dir) | a checkpoint path
    # Also write each checkpoint as a Hugging Face model (`kha-train export`, run in the
    # background on the CPU by rank 0) to <logging.run_dir>/hf/step_XXXXXXX; keeps keep_last.
    export_hf: bool = False
