"""Weights & Biases logging that never stops training.

Every call is guarded: the first failure is reported once on the console and W&B is then
switched off for the rest of the run (the JSONL log is unaffected). ``auto`` mode goes online
only when an API key is available (``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai)
and offline otherwise; an online start that fails falls back to offline. Runs are written under
``<run_dir>/wandb/``; offline ones upload later with ``wandb sync <run_dir>/wandb/offline-run-*``.
A resumed run continues the same W&B run (its id is kept in ``<run_dir>/wandb_run_id``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kha_train.config import WandbMode
from kha_train.training.metrics import flatten, metric_prefix
from kha_train.training.spikes import dominant_part

# The x axis of every W&B metric: the trainer's optimizer step (see WandbLogger._start).
STEP_KEY = "trainer/step"


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


SPIKE_COLUMNS = [
    "step", "metric", "value", "z", "ratio", "loss", "grad_norm", "grad_norm_from", "action",
    "top_sample", "sample_ids",
]  # fmt: skip
TOP_SAMPLE_CHARS = 300  # of the decoded text in the table's top_sample cell


def spike_row(s: dict[str, Any]) -> list[Any]:
    """One row of the spikes table: the record's fields, the action (``skipped`` by the spike
    guard, else ``logged``) and its sample of the highest loss, if the spike was explained
    (``spike_explain.py``): id, loss and the start of its decoded text."""
    top = (s.get("top_samples") or [None])[0]
    cell = ""
    if top is not None:
        text = " ".join((top.get("text") or "").split())[:TOP_SAMPLE_CHARS]
        cell = f"sample {top.get('id')} (loss {top.get('loss', float('nan')):.4g}): {text}"
    derived = {
        "grad_norm_from": dominant_part(s.get("grad_norm_parts")),  # "experts 80%"
        "action": "skipped" if s.get("skipped") else "logged",
        "top_sample": cell,
        "sample_ids": str(s.get("sample_ids", [])),
    }
    return [derived[c] if c in derived else s.get(c) for c in SPIKE_COLUMNS]


class WandbLogger:
    """W&B run that never raises: the first failure is reported once, then W&B is switched off.

    The run starts with the first metric (a run with nothing to do never creates one) and W&B's
    own console output is silenced: kha-train prints one line when it starts and one when it
    finishes (the run's URL, or where the offline run is and how to upload it)."""

    def __init__(
        self,
        *,
        mode: str,
        project: str,
        entity: str | None,
        name: str,
        run_dir: Path,
        config: dict[str, Any],
        info: Callable[[str], None],  # prints one console line (the run's console logger)
        resume: bool,
    ) -> None:
        self.info = info
        self.mode = mode
        self.run = None
        self._failed = False
        self._started = False
        self._spike_rows: list[list[Any]] = []
        self._start_args = dict(
            project=project, entity=entity, name=name, run_dir=run_dir, config=config,
            resume=resume,
        )  # fmt: skip

    def _start(self) -> None:
        """Create the W&B run (once; called by the first log)."""
        if self._started:
            return
        self._started = True
        a = self._start_args
        run_dir: Path = a["run_dir"]
        id_file = run_dir / "wandb_run_id"
        try:
            import wandb

            run_id = id_file.read_text().strip() if a["resume"] and id_file.exists() else None
            run_id = run_id or _new_run_id()
            kwargs = dict(
                project=a["project"], entity=a["entity"], name=a["name"], dir=str(run_dir),
                config=a["config"], id=run_id, resume="allow", settings=_quiet_settings(wandb),
            )  # fmt: skip
            try:
                self.run = wandb.init(mode=self.mode, **kwargs)
            except Exception as e:
                if self.mode != "online":
                    raise
                self.info(
                    f"warning: W&B online start failed ({_short(e)}); logging offline to "
                    f"{run_dir / 'wandb'} instead (upload later with `wandb sync`)"
                )
                self.mode = "offline"
                self.run = wandb.init(mode="offline", **kwargs)
            # Every metric's x axis is the trainer's step, logged as a value (STEP_KEY), not as
            # W&B's own step, which only goes forward: the steps a resume or a rollback trains
            # again would otherwise be dropped, curves and all.
            self.run.define_metric(STEP_KEY)
            self.run.define_metric("*", step_metric=STEP_KEY)
            id_file.write_text(run_id + "\n")
            self.info(f"W&B: {self.mode} run {run_id} ({a['project']})")
        except Exception as e:
            self._fail("start", e)

    def _fail(self, what: str, e: BaseException) -> None:
        if not self._failed:
            self.info(
                f"warning: W&B failed during {what}: {_short(e)}. Training continues without "
                "W&B; every metric is still written to metrics.jsonl."
            )
        self._failed = True
        self.run = None

    def log(self, step: int, record: dict[str, Any]) -> None:
        self._start()
        if self.run is None:
            return
        try:
            prefix = metric_prefix(record)
            values = {prefix + k: v for k, v in flatten(record).items() if k != "step"}
            self.run.log({**values, STEP_KEY: step})
        except Exception as e:
            self._fail("log", e)

    def log_spikes(self, step: int, spikes: list[dict[str, Any]], total: int) -> None:
        if not spikes:
            return
        self._start()
        if self.run is None:
            return
        try:
            import wandb

            self._spike_rows.extend(spike_row(s) for s in spikes)
            # Tables are immutable once logged: log the whole list again under the same key.
            table = wandb.Table(columns=SPIKE_COLUMNS, data=self._spike_rows)
            self.run.log({"spikes/table": table, STEP_KEY: step})
            self.run.summary["spikes/total"] = total
        except Exception as e:
            self._fail("spike logging", e)

    def mark_rolled_back(self, step: int, to_step: int) -> None:
        """A rollback to the checkpoint of ``to_step``, decided at ``step``: the table's spikes
        after ``to_step`` say "rolled back", and the table is logged again."""
        at, action = SPIKE_COLUMNS.index("step"), SPIKE_COLUMNS.index("action")
        rows = [r for r in self._spike_rows if r[at] > to_step and "rolled" not in r[action]]
        if not rows or self.run is None:
            return
        for r in rows:
            r[action] = "rolled back" if r[action] == "logged" else f"{r[action]}, rolled back"
        try:
            import wandb

            table = wandb.Table(columns=SPIKE_COLUMNS, data=self._spike_rows)
            self.run.log({"spikes/table": table, STEP_KEY: step})
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
        where = _where(self.run, self.mode)
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            self._fail("finish", e)
            return
        self.run = None
        if where:
            self.info(where)


def _quiet_settings(wandb: Any) -> Any:
    """Settings that silence W&B's own console output (~45 lines per run), where supported."""
    try:
        return wandb.Settings(silent=True)
    except Exception:  # an old or stub wandb module
        return None


def _where(run: Any, mode: str) -> str | None:
    """The one line a user needs at the end: the run's URL, or the offline run's folder and the
    command that uploads it."""
    try:
        if mode == "online" and getattr(run, "url", None):
            return f"W&B: {run.url}"
        folder = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>/files -> the run
        return f"W&B: offline run in {folder}; upload it with `wandb sync {folder}`"
    except Exception:
        return None


def _new_run_id() -> str:
    """A W&B-style run id (8 characters of [a-z0-9])."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
