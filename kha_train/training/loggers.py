"""Where metrics go: the console (progress bar + one line per logging step), a JSONL file
(always), Weights & Biases (online / offline / disabled) and optionally TensorBoard.

Only rank 0 builds loggers. Records are flat dicts; a list value (e.g. one number per MoE layer)
is kept as a list in JSONL and expanded to ``key/layer_i`` scalars for W&B and TensorBoard.

W&B never stops training: every call is guarded, the first failure is reported once on the
console and W&B is then switched off for the rest of the run (the JSONL log is unaffected).
``auto`` mode goes online only when an API key is available (``WANDB_API_KEY`` or a
``~/.netrc`` entry for api.wandb.ai) and offline otherwise; an online start that fails falls
back to offline. Offline runs are written under ``<run_dir>/wandb/`` and can be uploaded later
with ``wandb sync <run_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from kha_train.config import ConfigError, WandbMode
from kha_train.training.metrics import format_duration

# ----------------------------------------------------------------------------------------------
# Console
# ----------------------------------------------------------------------------------------------


class ConsoleLogger:
    """A progress bar with ETA (when the stream is a terminal) and a line per logging step."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.total_steps = total_steps
        use_bar = self.stream.isatty() if bar is None else bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, file=self.stream, unit="step",
                dynamic_ncols=True, leave=True, smoothing=0.05,
            )  # fmt: skip

    def info(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def advance(self, step: int) -> None:
        """Move the bar to ``step`` (host-side only; called every step)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, record: dict[str, Any]) -> None:
        self.info(format_record(record, self.total_steps))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_record(r: dict[str, Any], total_steps: int) -> str:
    """One human line for a train or val record."""
    step = r.get("step", 0)
    width = len(str(total_steps))
    parts = [f"step {step:>{width}}/{total_steps}"]
    if r.get("type") == "val":
        parts.append(f"val_loss {r['val_loss']:.4f}")
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
        self._f.write(json.dumps(_jsonable(record), allow_nan=True) + "\n")
        self._f.flush()

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


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """Scalar view of a record: numbers kept, lists expanded to ``key/layer_i``, rest dropped."""
    out: dict[str, float] = {}
    for k, v in record.items():
        if isinstance(v, (bool, int, float)):
            out[k] = float(v)
        elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            for i, x in enumerate(v):
                out[f"{k}/layer_{i}"] = float(x)
    return out


# ----------------------------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------------------------


def wandb_api_key_available() -> bool:
    """Whether an API key is configured, without importing wandb or touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_wandb_mode(mode: WandbMode) -> str:
    if mode == WandbMode.auto:
        return "online" if wandb_api_key_available() else "offline"
    return mode.value


SPIKE_COLUMNS = ["step", "metric", "value", "z", "ratio", "loss", "grad_norm", "sample_ids"]


class WandbLogger:
    """W&B run that never raises: the first failure is reported once, then W&B is switched off."""

    def __init__(
        self,
        *,
        mode: str,
        project: str,
        entity: str | None,
        name: str,
        run_dir: Path,
        config: dict[str, Any],
        console: ConsoleLogger,
        resume: bool,
    ) -> None:
        self.console = console
        self.mode = mode
        self.run = None
        self._failed = False
        self._spike_rows: list[list[Any]] = []
        id_file = run_dir / "wandb_run_id"
        try:
            import wandb

            run_id = id_file.read_text().strip() if resume and id_file.exists() else None
            run_id = run_id or _new_run_id()
            kwargs = dict(
                project=project, entity=entity, name=name, dir=str(run_dir), config=config,
                id=run_id, resume="allow",
            )  # fmt: skip
            try:
                self.run = wandb.init(mode=mode, **kwargs)
            except Exception as e:
                if mode != "online":
                    raise
                self.console.info(
                    f"warning: W&B online start failed ({_short(e)}); logging offline to "
                    f"{run_dir / 'wandb'} instead (upload later with `wandb sync`)"
                )
                self.mode = "offline"
                self.run = wandb.init(mode="offline", **kwargs)
            id_file.write_text(run_id + "\n")
            self.console.info(f"W&B: {self.mode} run {run_id} ({project})")
        except Exception as e:
            self._fail("start", e)

    def _fail(self, what: str, e: BaseException) -> None:
        if not self._failed:
            self.console.info(
                f"warning: W&B failed during {what}: {_short(e)}. Training continues without "
                "W&B; every metric is still written to metrics.jsonl."
            )
        self._failed = True
        self.run = None

    def log(self, step: int, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            prefix = "val/" if record.get("type") == "val" else "train/"
            self.run.log(
                {prefix + k: v for k, v in flatten(record).items() if k != "step"}, step=step
            )
        except Exception as e:
            self._fail("log", e)

    def log_spikes(self, step: int, spikes: list[dict[str, Any]], total: int) -> None:
        if self.run is None or not spikes:
            return
        try:
            import wandb

            for s in spikes:
                self._spike_rows.append(
                    [s[c] if c != "sample_ids" else str(s[c]) for c in SPIKE_COLUMNS]
                )
            # Tables are immutable once logged: log the whole list again under the same key.
            self.run.log(
                {"spikes/table": wandb.Table(columns=SPIKE_COLUMNS, data=self._spike_rows)},
                step=step,
            )
            self.run.summary["spikes/total"] = total
        except Exception as e:
            self._fail("spike logging", e)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for k, v in values.items():
                self.run.summary[k] = v
        except Exception as e:
            self._fail("summary", e)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            self._fail("finish", e)
        self.run = None


def _new_run_id() -> str:
    """A W&B-style run id (8 characters of [a-z0-9])."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


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
        prefix = "val/" if record.get("type") == "val" else "train/"
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
                run_dir=run_dir, config=config, console=self.console, resume=resumed,
            )  # fmt: skip

    def info(self, message: str) -> None:
        if self.is_main:
            self.console.info(message)

    def advance(self, step: int) -> None:
        if self.is_main:
            self.console.advance(step)

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
        if echo:
            self.console.info(echo)

    def log_spikes(self, step: int, spikes: list[dict[str, Any]], total: int) -> None:
        if not self.is_main or not spikes:
            return
        for s in spikes:
            self.metrics.write(s)
            self.spikes.write(s)
            self.console.info(
                f"spike at step {s['step']}: {s['metric']} {s['value']:.4g} "
                f"(z={s['z']:.1f}, {s['ratio']:.2f}x the window mean); "
                f"{len(s['sample_ids'])} sample ids in spikes.jsonl"
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
