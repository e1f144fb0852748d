"""Where metrics go: the console (progress bar + one line per logging step), a JSONL file
(always), Weights & Biases (online / offline / disabled) and optionally TensorBoard.

Only rank 0 builds loggers. Records are flat dicts; a list value (e.g. one number per MoE layer)
is kept as a list in JSONL and expanded to ``key/layer_i`` scalars for W&B and TensorBoard.

W&B is in ``wandb_log.py``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from kha_train.config import ConfigError, WandbMode
from kha_train.fs import storage_error
from kha_train.training.metrics import flatten, format_duration, metric_prefix
from kha_train.training.spikes import dominant_part
from kha_train.training.wandb_log import WandbLogger, resolve_wandb_mode

# ----------------------------------------------------------------------------------------------
# Console
# ----------------------------------------------------------------------------------------------

HEARTBEAT_S = 30.0  # the longest the console stays silent while a run is alive


class ConsoleLogger:
    """A progress bar with ETA (when the stream is a terminal) and a line per logging step.

    A heartbeat keeps a quiet console alive: when nothing has been printed for
    ``heartbeat_s`` seconds (a long first step that compiles, a slow checkpoint save, a long
    validation), a line says what the run is doing (:meth:`activity`) and for how long."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        stream: TextIO | None = None,
        bar: bool | None = None,
        heartbeat_s: float | None = HEARTBEAT_S,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total_steps = total_steps
        self.step = start_step
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, file=self.stream, unit="step",
                dynamic_ncols=True, leave=True, smoothing=0.05,
            )  # fmt: skip
        self._lock = threading.Lock()
        self._last_output = time.monotonic()
        self._activity = "starting"
        self._activity_since = self._last_output
        self._stop = threading.Event()
        self._heartbeat = None
        if heartbeat_s:
            self._heartbeat = threading.Thread(
                target=self._beat, args=(heartbeat_s,), name="kha-heartbeat", daemon=True
            )
            self._heartbeat.start()

    def info(self, message: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.write(message, file=self.stream)
            else:
                print(message, file=self.stream, flush=True)
            self._last_output = time.monotonic()

    def activity(self, what: str) -> None:
        """What the run is doing now (named by the heartbeat line), e.g. 'training'."""
        self._activity, self._activity_since = what, time.monotonic()

    def advance(self, step: int) -> None:
        """Move the bar to ``step`` (host-side only; called every step)."""
        self.step = step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(min(1.0, every_s / 4)):
            now = time.monotonic()
            if now - self._last_output >= every_s:
                self.info(
                    f"... {self._activity} for {format_duration(now - self._activity_since)} "
                    f"(step {self.step}/{self.total_steps} done)"
                )

    def log(self, record: dict[str, Any]) -> None:
        self.info(format_record(record, self.total_steps))

    def stop_heartbeat(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.stop_heartbeat()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_record(r: dict[str, Any], total_steps: int) -> str:
    """One human line for a train, val or eval record."""
    step = r.get("step", 0)
    width = len(str(total_steps))
    parts = [f"step {step:>{width}}/{total_steps}"]
    if r.get("type") == "val":
        parts.append(f"val_loss {r['val_loss']:.4f}")
        return " | ".join(parts)
    if r.get("type") == "eval":
        for key in r:
            if key.endswith("/loss"):
                name = key[: -len("/loss")]
                bpb = r.get(f"{name}/bpb")
                parts.append(f"eval {name} loss {r[key]:.4f}" + (f" bpb {bpb:.4f}" if bpb else ""))
        parts.append(f"{r['seconds']:.1f} s ({r['share']:.1%} of the time since the last)")
        return " | ".join(parts)

    def add(key: str, fmt: str) -> None:
        if key in r and r[key] is not None:
            parts.append(fmt.format(r[key]))

    add("loss", "loss {:.4f}")
    add("grad_norm", "gnorm {:.3f}")
    add("lr", "lr {:.2e}")
    if "tokens_per_s" in r:
        parts.append(f"{_si(r['tokens_per_s'])} tok/s")
    add("mfu", "mfu {:.1%}")
    mem = r.get("mem_peak_alloc_gib", r.get("mem_peak_rss_gib"))
    if mem is not None:
        parts.append(f"mem {mem:.1f} GiB")
    if r.get("alloc_retries"):
        parts.append(f"alloc retries {r['alloc_retries']}")
    add("data_wait_frac", "data {:.0%}")
    if "moe_max_violation_mean" in r:
        parts.append(f"maxvio {r['moe_max_violation_mean']:.2f}")
    if r.get("nonfinite_skipped"):
        parts.append(f"skipped {r['nonfinite_skipped']}")
    if r.get("spikes_total"):
        parts.append(f"spikes {r['spikes_total']}")
    if "eta_s" in r:
        parts.append(f"eta {format_duration(r['eta_s'])}")
    return " | ".join(parts)


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.0f}"


# ----------------------------------------------------------------------------------------------
# JSONL
# ----------------------------------------------------------------------------------------------


class JsonlLogger:
    """Appends one JSON object per line, flushed at once.

    On a resumed run the file is first cut back to the checkpoint's step: records with
    ``step > keep_until_step`` came from the part of the previous run that the resume replays,
    and would otherwise appear twice. A fresh run (``keep_until_step=None``) starts a new file.
    """

    def __init__(self, path: str | os.PathLike[str], keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        try:
            self._open(keep_until_step)
        except OSError as e:
            raise storage_error(e, "write the log", self.path) from e

    def _open(self, keep_until_step: int | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if keep_until_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= keep_until_step:
                    kept.append(line)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self._f = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._f.write(json.dumps(_jsonable(record), allow_nan=True) + "\n")
            self._f.flush()
        except OSError as e:  # disk full, quota: one clear error (earlier lines are kept)
            raise storage_error(e, "write the log", self.path) from e

    def close(self) -> None:
        self._f.close()


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "nan" / "inf": strict JSON readers reject NaN literals
    return x


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record of a JSONL log (a line cut by a crash is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ----------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------


class TensorBoardLogger:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "logging.tensorboard=true needs the tensorboard package: "
                "pip install 'kha-train[tensorboard]' (or set logging.tensorboard=false)"
            ) from e
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, record: dict[str, Any]) -> None:
        prefix = metric_prefix(record)
        for k, v in flatten(record).items():
            if k != "step":
                self.writer.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------------------------
# All of them
# ----------------------------------------------------------------------------------------------


class RunLoggers:
    """Fan-out to every configured logger. On ranks other than 0 every method is a no-op.

    Files: ``<run_dir>/metrics.jsonl`` (every record, each with a ``type``: train, val, spike,
    nonfinite, checkpoint, end) and ``<run_dir>/spikes.jsonl`` (spike records only).
    """

    def __init__(
        self,
        *,
        run_dir: Path,
        name: str,
        wandb_mode: WandbMode,
        wandb_project: str,
        wandb_entity: str | None,
        tensorboard: bool,
        config: dict[str, Any],
        total_steps: int,
        start_step: int,
        resumed: bool,
        is_main: bool,
        console_stream: TextIO | None = None,
    ) -> None:
        self.is_main = is_main
        if not is_main:
            return
        keep = start_step if resumed else None
        self.console = ConsoleLogger(total_steps, start_step, stream=console_stream)
        self.metrics = JsonlLogger(run_dir / "metrics.jsonl", keep_until_step=keep)
        self.spikes = JsonlLogger(run_dir / "spikes.jsonl", keep_until_step=keep)
        self.tb = TensorBoardLogger(run_dir / "tensorboard") if tensorboard else None
        self.wandb = None
        mode = resolve_wandb_mode(wandb_mode)
        if mode != "disabled":
            self.wandb = WandbLogger(
                mode=mode, project=wandb_project, entity=wandb_entity, name=name,
                run_dir=run_dir, config=config, info=self.console.info, resume=resumed,
            )  # fmt: skip

    def info(self, message: str) -> None:
        if self.is_main:
            self.console.info(message)

    def advance(self, step: int) -> None:
        if self.is_main:
            self.console.advance(step)

    def activity(self, what: str) -> None:
        """What the run is doing now, for the console's heartbeat line."""
        if self.is_main:
            self.console.activity(what)

    def stop_heartbeat(self) -> None:
        """Stop the console's heartbeat (also when the run ends in an error; idempotent)."""
        if self.is_main:
            self.console.stop_heartbeat()

    def log(self, record: dict[str, Any]) -> None:
        """A train or val record: console line, JSONL, W&B, TensorBoard."""
        if not self.is_main:
            return
        self.console.log(record)
        self.metrics.write(record)
        if self.wandb is not None:
            self.wandb.log(record["step"], record)
        if self.tb is not None:
            self.tb.log(record["step"], record)

    def event(self, record: dict[str, Any], echo: str | None = None) -> None:
        """Any other record (nonfinite, checkpoint, end): JSONL, and the console if ``echo``."""
        if not self.is_main:
            return
        self.metrics.write(record)
        if record.get("type") == "rollback" and self.wandb is not None:
            # The steps after to_step are trained again and logged at their own steps (W&B's x
            # axis is the trainer's step); the spikes table relabels the abandoned rows.
            self.wandb.mark_rolled_back(record["from_step"], record["to_step"])
            self.wandb.log(record["step"], {"type": "rollback", "rollbacks": record["count"]})
        if echo:
            self.console.info(echo)

    def log_spikes(self, step: int, spikes: list[dict[str, Any]], total: int) -> None:
        if not self.is_main or not spikes:
            return
        for s in spikes:
            self.metrics.write(s)
            self.spikes.write(s)
            part = dominant_part(s.get("grad_norm_parts"))
            self.console.info(
                f"spike at step {s['step']}: {s['metric']} {s['value']:.4g} "
                f"(z={s['z']:.1f}, {s['ratio']:.2f}x the window mean"
                + (f"; grad norm from {part}" if part != "-" else "")
                + f"); {len(s['sample_ids'])} sample ids in spikes.jsonl"
            )
        if self.wandb is not None:
            self.wandb.log_spikes(step, spikes, total)

    def close(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        if not self.is_main:
            return
        if self.wandb is not None:
            self.wandb.summary(summary)
            self.wandb.finish(exit_code)
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()
        self.spikes.close()
        self.console.close()
