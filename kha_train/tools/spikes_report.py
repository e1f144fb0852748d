"""`kha-train spikes RUN_DIR`: every loss / grad-norm spike of a run, what was done about it, and
the samples of the highest loss in the worst ones.

Reads ``RUN_DIR/metrics.jsonl`` and, after rollbacks, ``RUN_DIR/rolled_back.jsonl`` (no model,
no GPU, no torch), in the order the run logged them:

- ``spike`` (the detector, ``training/spikes.py``): step, metric, value, z, loss, grad norm,
  ``skipped``; on explained spikes also ``top_samples`` (id, loss, decoded text),
  ``scored_at_step`` and ``scored_batch_loss`` (``training/spike_explain.py``);
- ``spike_skip`` / ``spike_guard_reset`` (the spike guard): the step was skipped / applied as
  the guard gave in; the guard's z of both metrics;
- ``nonfinite``: a step whose loss or grad norm was not finite, skipped;
- ``rollback`` (``training/rollback.py``: ``count``, ``from_step`` where it was decided,
  ``to_step`` the checkpoint it went back to, ``skipped_samples``): every spike logged before
  this record at a step after ``to_step`` was undone ("rolled back"); the steps trained again
  after it are new rows. At a rollback the trainer moves the records of the abandoned steps
  from metrics.jsonl to rolled_back.jsonl, tagged ``rolled_back_by`` (the rollback's
  ``count``): they are read back in just before their rollback record.

One row per spike step (the detector's spikes of one step, and the guard's record of it, are
merged), the part of the model its gradient norm came from most (``grad_norm_parts``), its action ``logged`` (applied), ``skipped``, ``guard reset`` (a spike applied after
``max_in_row`` skipped ones) or ``rolled back``; then, for the ``--top`` worst explained steps
(highest z), their samples' decoded text. ``--json OUT`` writes all of it as JSON.

With several runs (``kha-train spikes RUN_A RUN_B ...``, e.g. the variants and seeds of a study,
which share their data order) it compares them instead: one row per step that spiked in any
run, in how many runs it spiked, and whether the runs that logged the step's batch (its
``sample_ids``) saw the same samples. A step that spikes in several runs on the same batch is
the data's, not a fault or one run's state (``kha-train replay`` answers the same for one run,
with a GPU). Archived metrics (``metrics.jsonl.gz``, as scripts/study.py keeps them) are read
too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kha_train.training.spikes import dominant_part

METRICS_FILE = "metrics.jsonl"
ROLLED_BACK_FILE = "rolled_back.jsonl"  # training/rollback.py: the abandoned steps' records


class SpikesReportError(Exception):
    """The run directory cannot be read (printed by the CLI as one error line)."""


@dataclass
class SpikeRow:
    step: int
    metrics: list[str] = field(default_factory=list)  # what spiked: loss, grad_norm, non-finite
    loss: float | None = None
    grad_norm: float | None = None
    loss_z: float | None = None  # the detector's z, else the spike guard's
    grad_norm_z: float | None = None
    skipped: bool = False  # the update was not applied (spike guard or non-finite)
    guard_reset: bool = False  # applied: the guard gave in after max_in_row skipped spikes
    rolled_back: bool = False  # undone by a rollback to an earlier checkpoint
    rollback_step: int | None = None  # the step at which that rollback was decided
    sample_ids: list[int] = field(default_factory=list)
    grad_norm_parts: dict[str, float] = field(default_factory=dict)  # training/grad_parts.py
    scored_at_step: int | None = None
    scored_batch_loss: float | None = None
    top_samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def action(self) -> str:
        done = "skipped" if self.skipped else "guard reset" if self.guard_reset else "logged"
        if self.rolled_back:
            return "rolled back" if done == "logged" else f"{done}, rolled back"
        return done

    @property
    def z(self) -> float:
        """The highest z of the step (inf for a non-finite step)."""
        if "non-finite" in self.metrics:
            return math.inf
        zs = [z for z in (self.loss_z, self.grad_norm_z) if isinstance(z, (int, float))]
        return max(zs) if zs else -math.inf

    @property
    def grad_norm_from(self) -> str:
        """The part of the model with the largest share of the squared grad norm, and that
        share ("router 91%"); "-" where the step's record has no split."""
        return dominant_part(self.grad_norm_parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "action": self.action, "grad_norm_from": self.grad_norm_from}


@dataclass
class SpikeReport:
    run_dir: Path
    rows: list[SpikeRow]  # in the order the run met them
    rollbacks: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "spikes": [r.to_dict() for r in self.rows],
            "rollbacks": self.rollbacks,
        }


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a JSONL log (a line cut by a crash is skipped)."""
    out = []
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def metrics_path(run: Path) -> Path:
    path = run if run.is_file() else run / METRICS_FILE
    if not path.is_file() and (run / f"{METRICS_FILE}.gz").is_file():  # a study archive
        path = run / f"{METRICS_FILE}.gz"
    if not path.is_file():
        what = "does not exist" if not run.exists() else f"holds no {METRICS_FILE}"
        raise SpikesReportError(
            f"{run} {what}: give the run directory of a kha-train run (logging.run_dir, e.g. "
            f"runs/<name>) or its {METRICS_FILE}"
        )
    return path


def build_report(run: Path) -> SpikeReport:
    """The spikes of ``run`` (a run directory or its metrics.jsonl), merged per step."""
    path = metrics_path(run)
    side = ROLLED_BACK_FILE + (".gz" if path.suffix == ".gz" else "")  # an archive's is gzipped
    records = _timeline(read_records(path), path.parent / side)
    rows: list[SpikeRow] = []
    live: dict[int, SpikeRow] = {}  # step -> its row, until a rollback undoes the step
    rollbacks = []
    for rec in records:
        kind, step = rec.get("type"), rec.get("step")
        if kind == "rollback":
            rollbacks.append(rec)
            back_to = _int(rec.get("to_step"))
            if back_to is None:
                continue
            for s in [s for s in live if s > back_to]:
                row = live.pop(s)
                row.rolled_back = True
                row.rollback_step = _int(rec.get("from_step")) or _int(step)
            continue
        if kind not in ("spike", "spike_skip", "spike_guard_reset", "nonfinite"):
            continue
        if not isinstance(step, int):
            continue
        row = live.get(step)
        if row is None:
            row = live[step] = SpikeRow(step)
            rows.append(row)
        row.loss = _num(rec.get("loss"), row.loss)
        row.grad_norm = _num(rec.get("grad_norm"), row.grad_norm)
        row.sample_ids = rec.get("sample_ids") or row.sample_ids
        row.grad_norm_parts = rec.get("grad_norm_parts") or row.grad_norm_parts
        if kind == "spike":
            metric = rec.get("metric")
            if metric in ("loss", "grad_norm"):
                _add(row.metrics, metric)
                setattr(row, f"{metric}_z", _num(rec.get("z"), None))
            row.skipped = row.skipped or bool(rec.get("skipped"))
        elif kind == "nonfinite":
            _add(row.metrics, "non-finite")
            row.skipped = True
        else:  # the spike guard's record: its z where the detector gave none
            for metric in rec.get("metrics") or []:
                _add(row.metrics, metric)
            for m in ("loss", "grad_norm"):
                if getattr(row, f"{m}_z") is None:
                    setattr(row, f"{m}_z", _num(rec.get(f"{m}_z"), None))
            if kind == "spike_skip":
                row.skipped = True
            else:
                row.guard_reset = True
        if rec.get("top_samples"):
            row.top_samples = rec["top_samples"]
            row.scored_at_step = _int(rec.get("scored_at_step"))
            row.scored_batch_loss = _num(rec.get("scored_batch_loss"), None)
    return SpikeReport(run, rows, rollbacks)


def _timeline(records: list[dict[str, Any]], side: Path) -> list[dict[str, Any]]:
    """``records`` with the abandoned records of each rollback (``side``, rolled_back.jsonl)
    put back just before that rollback's record; those of a rollback without a record last."""
    moved: dict[Any, list[dict[str, Any]]] = {}
    for rec in read_records(side) if side.is_file() else []:
        moved.setdefault(rec.get("rolled_back_by"), []).append(rec)
    out = []
    for rec in records:
        if rec.get("type") == "rollback":
            out += moved.pop(rec.get("count"), [])
        out.append(rec)
    for recs in moved.values():  # no rollback record (a cut log): still undone
        out += recs
        back_to = min((r["step"] for r in recs if isinstance(r.get("step"), int)), default=1) - 1
        out.append({"type": "rollback", "to_step": back_to, "count": recs[0]["rolled_back_by"]})
    return out


def format_report(report: SpikeReport, top: int = 5, width: int = 100) -> str:
    """The table of every spike, the rollbacks, then the samples of the ``top`` worst steps."""
    rows = report.rows
    if not rows:
        return f"{report.run_dir}: no spikes logged" + _rollback_lines(report)
    counts = {a: sum(r.action == a for r in rows) for a in dict.fromkeys(r.action for r in rows)}
    head = ", ".join(f"{n} {a}" for a, n in counts.items())
    lines = [f"{report.run_dir}: {len(rows)} spike step(s): {head}", ""]
    cols = ("step", "spiked", "loss", "loss z", "grad norm", "gnorm z", "gnorm from", "action",
            "samples")  # fmt: skip
    table = [
        (
            str(r.step), "+".join(r.metrics) or "-", _fmt(r.loss), _fmt(r.loss_z, ".1f"),
            _fmt(r.grad_norm), _fmt(r.grad_norm_z, ".1f"), r.grad_norm_from, r.action,
            f"{len(r.top_samples)} decoded" if r.top_samples else "-",
        )
        for r in rows
    ]  # fmt: skip
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    left = {1, 6, 7, 8}  # text columns
    for line in [cols, *table]:
        cells = [
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    extra = _rollback_lines(report)
    if extra:
        lines.append(extra.lstrip("\n"))
    worst = sorted((r for r in rows if r.top_samples), key=lambda r: (-r.z, r.step))[:top]
    for r in worst:
        lines += ["", _sample_heading(r), *_sample_lines(r, width)]
    hidden = sum(1 for r in rows if r.top_samples) - len(worst)
    if hidden > 0:
        lines += ["", f"({hidden} more explained spike step(s): raise --top, or see --json)"]
    return "\n".join(line.rstrip() for line in lines)


def _sample_lines(r: SpikeRow, width: int) -> list[str]:
    """The decoded samples of an explained spike step, wrapped to ``width``."""
    lines = []
    for k, s in enumerate(r.top_samples, 1):
        lines.append(f"  #{k} sample {s.get('id')}: loss {_fmt(s.get('loss'))}")
        text = s.get("text")
        if text is None:
            lines.append(f"      (no text: {s.get('text_error') or 'not decoded'})")
            continue
        body = text + (" [...]" if s.get("truncated") else "")
        for para in body.splitlines() or [""]:
            wrapped = textwrap.wrap(
                para, width=width, initial_indent="      ", subsequent_indent="      ",
                replace_whitespace=False, drop_whitespace=False,
            )  # fmt: skip
            lines += wrapped or ["      "]
    return lines


def _sample_heading(r: SpikeRow) -> str:
    zs = ", ".join(
        f"{m.replace('_', ' ')} z {z:.1f}"
        for m, z in (("loss", r.loss_z), ("grad_norm", r.grad_norm_z))
        if isinstance(z, (int, float))
    )
    scored = f"scored at step {r.scored_at_step}" if r.scored_at_step is not None else "scored"
    mean = (
        f", batch mean loss {r.scored_batch_loss:.4g}"
        if isinstance(r.scored_batch_loss, (int, float))
        else ""
    )
    return (
        f"step {r.step} ({r.action}; {zs or 'no z'}): the {len(r.top_samples)} sample(s) of the "
        f"highest loss in its batch of {len(r.sample_ids)}, {scored}{mean}"
    )


def _rollback_lines(report: SpikeReport) -> str:
    out = []
    for rb in report.rollbacks:
        skipped = rb.get("skipped_samples") or []
        if len(skipped) == 2 and all(isinstance(x, int) for x in skipped):
            skipped = [skipped]  # one range [start, end)
        ranges = ", ".join(
            f"[{x[0]}, {x[1]})" for x in skipped if isinstance(x, list) and len(x) == 2
        )
        number = f" {rb['count']}" if rb.get("count") is not None else ""
        start = f" at step {rb['from_step']}" if rb.get("from_step") is not None else ""
        reason = f" ({rb['reason']})" if rb.get("reason") else ""
        out.append(
            f"rollback{number}{start}{reason}: back to the checkpoint of step "
            f"{rb.get('to_step')}" + (f"; global samples {ranges} skipped" if ranges else "")
        )
    return "\n\n" + "\n".join(out) if out else ""


@dataclass
class StepAcrossRuns:
    """One step that spiked in at least one of several runs."""

    step: int
    z: dict[str, float]  # run label -> the step's highest z in that run (inf: non-finite)
    batch: str  # "same" | "differs" | "-" (fewer than two runs logged the step's batch)
    runs: int  # how many runs were compared
    grad_norm_from: str = "-"  # the dominant part of the run with the highest z there

    @property
    def verdict(self) -> str:
        if len(self.z) < 2:
            return "one run"
        return {"same": "the data's", "differs": "other batches"}.get(self.batch, "several runs")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def compare_runs(reports: list[SpikeReport]) -> list[StepAcrossRuns]:
    """The spike steps of several runs, the most widespread first (then by step)."""
    labels = run_labels([r.run_dir for r in reports])
    z: dict[int, dict[str, float]] = {}
    batches: dict[int, dict[str, tuple[int, ...]]] = {}  # step -> run -> the batch it logged
    worst: dict[int, SpikeRow] = {}  # step -> the row of the highest z with a grad norm split
    for label, report in zip(labels, reports):
        for row in report.rows:  # a step rolled back and trained again: its last batch
            z.setdefault(row.step, {})
            z[row.step][label] = max(z[row.step].get(label, -math.inf), row.z)
            if row.sample_ids:
                batches.setdefault(row.step, {})[label] = tuple(sorted(row.sample_ids))
            if row.grad_norm_parts and (row.step not in worst or row.z > worst[row.step].z):
                worst[row.step] = row
    out = []
    for step, by_run in z.items():
        seen = batches.get(step, {})
        batch = "-" if len(seen) < 2 else "same" if len(set(seen.values())) == 1 else "differs"
        part = worst[step].grad_norm_from if step in worst else "-"
        out.append(StepAcrossRuns(step, by_run, batch, len(reports), part))
    return sorted(out, key=lambda c: (-len(c.z), c.step))


def run_labels(paths: list[Path]) -> list[str]:
    """Short names for runs: the run directory's name (of a metrics file: its folder's), made
    unique with the folder above where two share it."""
    dirs = [p.parent if p.is_file() or p.suffix in (".jsonl", ".gz") else p for p in paths]
    names = [d.name or str(d) for d in dirs]
    labels = [f"{d.parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]
    return [  # still alike (a run given twice, say): numbered, so that none merges with another
        f"{lb} ({i + 1})" if labels.count(lb) > 1 else lb for i, lb in enumerate(labels)
    ]


def format_comparison(
    reports: list[SpikeReport], rows: list[StepAcrossRuns], top: int = 5, width: int = 100
) -> str:
    """The table of ``compare_runs``: step, runs that spiked there, their z, the batch; then,
    for the ``top`` most widespread steps of the data's, the samples of the highest loss in
    their batch, from the first run that explained the step."""
    labels = run_labels([r.run_dir for r in reports])
    if not rows:
        return f"{len(reports)} runs: no spikes logged in any"
    recurring = sum(1 for r in rows if r.verdict == "the data's")
    lines = [
        f"{len(reports)} runs, {len(rows)} spike step(s); {recurring} spiked in several runs on "
        "the same batch (the data's)",
        "",
    ]
    cols = ("step", "runs", "z (min-max)", "batch", "verdict", "gnorm from", "spiked in")
    table = []
    for r in rows:
        zs = [z for z in r.z.values() if math.isfinite(z)]
        zr = "-" if not zs else f"{min(zs):.1f}" if len(zs) == 1 else f"{min(zs):.1f}-{max(zs):.1f}"
        if any(z == math.inf for z in r.z.values()):  # SpikeRow.z of a non-finite step
            zr += " (+non-finite)"
        who = "all" if len(r.z) == r.runs else ", ".join(lb for lb in labels if lb in r.z)
        table.append((str(r.step), f"{len(r.z)}/{r.runs}", zr, r.batch, r.verdict,
                      r.grad_norm_from, who))  # fmt: skip
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    for line in [cols, *table]:
        cells = [c.rjust(w) if i < 2 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    shown = 0
    for r in rows:
        if shown == top or r.verdict != "the data's":
            continue
        found = next(((lb, row) for lb, rep in zip(labels, reports) for row in rep.rows
                      if row.step == r.step and row.top_samples), None)  # fmt: skip
        if found is not None:
            lines += [
                "",
                f"{found[0]}: {_sample_heading(found[1])}",
                *_sample_lines(found[1], width),
            ]
            shown += 1
    return "\n".join(line.rstrip() for line in lines)


def _fmt(x: Any, spec: str = ".4g") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-" if x is None else str(x)
    return format(x, spec)


def _num(x: Any, default: float | None) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, str):  # non-finite values are logged as "nan" / "inf"
        try:
            return float(x)
        except ValueError:
            return default
    return default


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats as "nan" / "inf" (as metrics.jsonl writes them)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def run_spikes(args: argparse.Namespace) -> int:
    """The `kha-train spikes` command."""
    runs = args.run_dir if isinstance(args.run_dir, list) else [args.run_dir]
    reports = [build_report(Path(r)) for r in runs]
    if len(reports) == 1:
        report = reports[0]
        data, text = report.to_dict(), format_report(report, top=args.top)
    else:
        rows = compare_runs(reports)
        data = {"runs": [r.to_dict() for r in reports], "steps": [r.to_dict() for r in rows]}
        text = format_comparison(reports, rows, top=args.top)
    if args.json == "-":  # the JSON alone, for a pipe
        sys.stdout.write(json.dumps(_jsonable(data), indent=2) + "\n")
        return 0
    print(text)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
        print(f"\nwritten: {out}")
    return 0
