"""``checkpoint.export_hf``: a Hugging Face export of every checkpoint, made in the background.

When a checkpoint is complete (published), rank 0 starts ``kha-train export CKPT --out
<run_dir>/hf/step_XXXXXXX`` as a child process: it reads the checkpoint from disk on the CPU
(training keeps the GPU and is not slowed by more than a CPU core), writes to a temporary folder
and renames it when done, so a folder under ``hf/`` is always a whole export. The child is a
separate program, not an import: the trainer does not depend on the tools package.

One export runs at a time. Before the next checkpoint is saved (whose rotation may delete the
one being read) the trainer waits for it. A failed export is a warning with the tail of its
output, never the end of the run. The newest ``checkpoint.keep_last`` exports are kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HF_DIR = "hf"
TMP_SUFFIX = ".tmp"
LOG_FILE = "export.log"  # the output of the latest export, beside the exports
# Launcher variables a child must not see: it is one process, not a rank of this job.
RANK_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
)  # fmt: skip

Report = Callable[[str, dict], None]  # (console line, JSONL record)


class HFExporter:
    """Rank 0's background exports of published checkpoints (module docstring)."""

    def __init__(self, run_dir: Path, keep_last: int, report: Report) -> None:
        self.out_dir = run_dir / HF_DIR
        self.keep_last = keep_last
        self.report = report
        self._job: tuple[int, Path, subprocess.Popen, float] | None = None

    def start(self, step: int, checkpoint: Path) -> None:
        """Export ``checkpoint`` (of optimizer step ``step``) in the background."""
        self.wait()
        final = self.out_dir / checkpoint.name
        tmp = final.with_name(final.name + TMP_SUFFIX)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._launch(step, checkpoint, final, tmp)
        except OSError as e:  # a full disk or a bad folder must not end the run
            record = {"type": "export_failed", "step": step, "output": str(e)}
            self.report(
                f"warning: could not start the Hugging Face export of step {step}: {e}", record
            )

    def _launch(self, step: int, checkpoint: Path, final: Path, tmp: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
        env["CUDA_VISIBLE_DEVICES"] = ""  # the export runs on the CPU: leave the GPU to training
        cmd = [sys.executable, "-m", "kha_train.cli", "export", str(checkpoint), "--out", str(tmp)]
        log = self.out_dir / LOG_FILE
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        self._job = (step, final, proc, time.monotonic())

    def poll(self) -> None:
        """Report a finished export (non-blocking)."""
        if self._job is not None and self._job[2].poll() is not None:
            self.wait()

    def wait(self) -> None:
        """Block until the running export (if any) ends, then report it."""
        if self._job is None:
            return
        step, final, proc, t0 = self._job
        self._job = None
        code = proc.wait()
        tmp = final.with_name(final.name + TMP_SUFFIX)
        seconds = time.monotonic() - t0
        if code == 0 and tmp.is_dir():
            try:
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
                self._rotate()
            except OSError as e:
                record = {"type": "export_failed", "step": step, "output": str(e)}
                self.report(f"warning: could not publish the export of step {step}: {e}", record)
                return
            record = {"type": "export", "step": step, "path": str(final), "seconds": seconds}
            self.report(f"exported step {step} to {final} ({seconds:.0f} s)", record)
            return
        shutil.rmtree(tmp, ignore_errors=True)
        output = (self.out_dir / LOG_FILE).read_text(errors="replace")
        tail = " | ".join(output.strip().splitlines()[-3:])
        record = {"type": "export_failed", "step": step, "exit_code": code, "output": tail}
        self.report(
            f"warning: the Hugging Face export of step {step} failed (exit {code}): {tail}. "
            "Training goes on; export by hand with `kha-train export CHECKPOINT --out DIR`",
            record,
        )

    def _rotate(self) -> None:
        done = sorted(p for p in self.out_dir.glob("step_*") if not p.name.endswith(TMP_SUFFIX))
        for old in done[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
