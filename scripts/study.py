"""The replication study runner: train every run of a study with `kha-train train`, evaluate and
analyse each finished run, and keep what a report needs in the repository.

    python scripts/study.py status configs/study/table2.yaml
    python scripts/study.py run    configs/study/table2.yaml [--only kha_mlp_v-s1] [--deadline-s 540]
    python scripts/study.py report configs/study/*.yaml

A study file (configs/study/*.yaml) names a kha-train config (``config``), ``seeds`` and
``variants`` (dotted config keys each), with ``overrides`` for every run; ``baseline``: the
variant the report compares with (default: the first), ``baselines: {variant: other}`` for
variants compared with another (the baseline at the same LR, say); ``borrow: {label:
<study>/<variant>}`` shows another study's archived runs of the same config here, untrained.
Run ``<variant>-s<seed>`` trains that config with ``train.seed=<seed>`` and the variant's keys,
in ``runs/study/<study>/<run>`` (``--runs``), through the same command users run, so the data
order (``data.seed``) is the same for every run.

Resumable. Each run trains with ``checkpoint.resume=auto`` and checkpoints every
``checkpoint.every_steps``; before ``--deadline-s`` runs out the runner sends the trainer SIGTERM
(it finishes its step, saves and exits 0) and stops, and the next call continues the run from
there (on the same machine: the GPU machine keeps its files while it stays warm). A finished run
is evaluated (`kha-train eval`: held-out loss and bits per byte on the val split), analysed
(router health, learned KHA matrices: ``analyze.py``), in a thread while the next run trains,
and archived: ``results.json``, ``metrics.jsonl.gz`` and ``kha.npz`` go to
``docs/results/<study>/<run>/`` (``--results``), small enough to commit. A run with an archive is done and never trained again (delete it to redo it).

``report`` reads only the archives: tables (mean and spread over seeds, difference to the
baseline and whether it exceeds the seed spread) to ``docs/results/<study>.md`` and plots to
``docs/results/<study>_*.png`` (``report.py``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # analyze.py, report.py beside this file

SAVE_MARGIN_S = 60.0  # SIGTERM this long before the deadline: the step, the save and the exit
FAILED_FILE = "FAILED"  # in a run directory: its trainer crashed (the log's tail); delete to retry
POLL_S = 2.0


@dataclass
class Run:
    study: str
    name: str  # <variant>-s<seed>
    variant: str
    seed: int
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)

    def train_args(self, run_dir: Path) -> list[str]:
        keys = {**self.overrides, "train.seed": self.seed, "name": f"{self.study}-{self.name}",
                "logging.run_dir": str(run_dir), "checkpoint.resume": "auto"}  # fmt: skip
        return [str(self.config), *(f"{k}={_dotlist_value(v)}" for k, v in keys.items())]


def _dotlist_value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def load_study(path: Path) -> tuple[str, list[Run], dict[str, Any]]:
    """(study name, its runs in order (seeds, and variants in file order inside), the file)."""
    spec = yaml.safe_load(path.read_text())
    for key in ("study", "config", "seeds", "variants"):
        if key not in spec:
            raise SystemExit(f"{path}: a study file needs '{key}' (see configs/study/table2.yaml)")
    config = (path.parent / spec["config"]).resolve()
    if not config.is_file():
        raise SystemExit(f"{path}: config {config} does not exist")
    runs = [  # every variant of the first seed first: one whole comparison as early as possible
        Run(spec["study"], f"{variant}-s{seed}", variant, int(seed), config,
            {**spec.get("overrides", {}), **(keys or {})})
        for seed in spec["seeds"]
        for variant, keys in spec["variants"].items()
    ]  # fmt: skip
    labels = {*spec["variants"], *spec.get("borrow", {})}
    for variant, base in {"": spec.get("baseline"), **spec.get("baselines", {})}.items():
        if (variant and variant not in spec["variants"]) or (
            base is not None and base not in labels
        ):
            raise SystemExit(f"{path}: baseline{'s' if variant else ''} '{variant or base}"
                             f"{': ' + str(base) if variant else ''}' needs variants (or borrowed "
                             f"labels) of this study: {sorted(labels)}")  # fmt: skip
    for label, source in spec.get("borrow", {}).items():
        study, _, variant = str(source).partition("/")
        other = path.parent / f"{study}.yaml"  # a study's file is named after it
        if (label in spec["variants"] or not other.is_file()
                or variant not in yaml.safe_load(other.read_text()).get("variants", {})):  # fmt: skip
            raise SystemExit(f"{path}: borrow '{label}: {source}' needs <study>/<variant> of a "
                             f"study file beside it, and a label that is not a variant here")  # fmt: skip
    return spec["study"], runs, spec


def borrowed(spec: dict[str, Any], results: Path) -> dict[Path, str]:
    """Archives of other studies that a study's report shows beside its own runs (``borrow:
    {label: <study>/<variant>}``: the same config, trained there; e.g. the lr study's runs at
    the paper's LR are table2's), each with the label it gets here, for every seed archived."""
    out = {}
    for label, source in spec.get("borrow", {}).items():
        study, _, variant = str(source).partition("/")
        for seed in spec["seeds"]:
            run = results / study / f"{variant}-s{seed}"
            if (run / "results.json").is_file():
                out[run] = label
    return out


# -- state -----------------------------------------------------------------------------------


def archive_dir(results: Path, run: Run) -> Path:
    return results / run.study / run.name


def is_archived(results: Path, run: Run) -> bool:
    return (archive_dir(results, run) / "results.json").is_file()


def trained(run_dir: Path) -> bool:
    """The trainer finished the run (its last record is a completed end)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    ends = [r for r in _records(path) if r.get("type") == "end"]
    return bool(ends) and ends[-1].get("status") == "completed"


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a (gzipped) JSONL log: a line cut by a kill is skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


# End statuses of a run that stopped because training itself failed (non-finite losses in a
# row; rollbacks used up): an outcome of the variant, archived like a finished run.
DIVERGED = ("nonfinite", "rollback_limit")


def diverged(run_dir: Path) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    ends = [r for r in _records(path) if r.get("type") == "end"]
    return bool(ends) and ends[-1].get("status") in DIVERGED


def archive_records(run_dir: Path, out: Path) -> list[dict[str, Any]]:
    """Gzip the run's metrics (and, after rollbacks, the abandoned steps' records, which
    `kha-train spikes` reads back) into the archive ``out``; return the metrics records."""
    records = _records(run_dir / "metrics.jsonl")
    for name, recs in (("metrics.jsonl", records), ("rolled_back.jsonl", None)):
        if recs is None:
            if not (run_dir / name).is_file():
                continue
            recs = _records(run_dir / name)
        with gzip.open(out / f"{name}.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    return records


def archive_diverged(run: Run, run_dir: Path, results: Path) -> None:
    """Archive a run that diverged: its records and a summary with no held-out figures."""
    out = archive_dir(results, run)
    out.mkdir(parents=True, exist_ok=True)
    records = archive_records(run_dir, out)
    summary = summarize(run, records, None, {})
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "results.json")
    print(f"study: {run.study}/{run.name} diverged ({summary['status']} at step "
          f"{summary['steps']}): archived", flush=True)  # fmt: skip


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = (
        [r["step"] for r in _records(path) if r.get("type") == "train"] if path.is_file() else []
    )
    return max(steps, default=0)


# -- commands --------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    for study_file in args.studies:
        name, runs, _ = load_study(Path(study_file))
        print(f"{name} ({study_file}):")
        for run in runs:
            run_dir = args.runs / name / run.name
            if is_archived(args.results, run):
                summary = json.loads((archive_dir(args.results, run) / "results.json").read_text())
                status = summary.get("status", "completed")
                state = "done (archived)" if status == "completed" else f"{status} (archived)"
            elif (run_dir / FAILED_FILE).is_file():
                state = f"failed: see {run_dir / FAILED_FILE}, delete it to retry"
            elif trained(run_dir):
                state = "trained, not yet evaluated"
            elif run_dir.exists():
                state = f"started, step {last_step(run_dir)}"
            else:
                state = "not started"
            print(f"  {run.name:<32} {state}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    finishing = Background()  # a trained run is evaluated while the next one trains
    failed: list[str] = []
    try:
        train_all(args, finishing, failed)
    except BaseException:
        finishing.wait()  # the evaluation under way ends (and is archived) first
        raise
    finishing.join()  # a failed evaluation ends the call with its error, after the rest
    if failed:
        raise SystemExit(f"study: failed runs, not trained again until their {FAILED_FILE} "
                         "file is deleted (or --retry-failed): " + "; ".join(failed))  # fmt: skip
    return 0


def train_all(args: argparse.Namespace, finishing: Background, failed: list[str]) -> None:
    """Train the runs in order until the deadline; hand each trained run to ``finishing``;
    a run whose trainer crashes (or crashed in an earlier call) is added to ``failed``."""
    deadline = time.monotonic() + args.deadline_s if args.deadline_s is not None else None
    for study_file in args.studies:
        _, runs, _ = load_study(Path(study_file))
        for run in runs:
            if args.only and run.name not in args.only:
                continue
            if is_archived(args.results, run):
                continue
            run_dir = args.runs / run.study / run.name
            if diverged(run_dir):
                archive_diverged(run, run_dir, args.results)
                continue
            if (run_dir / FAILED_FILE).is_file():
                if not args.retry_failed:
                    failed.append(
                        f"{run.study}/{run.name} (an earlier call: {run_dir / FAILED_FILE})"
                    )
                    continue
                (run_dir / FAILED_FILE).unlink()  # --retry-failed: once more, from its checkpoint
            if not trained(run_dir):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left < args.min_run_s:
                    print(f"study: {left:.0f} s left, less than --min-run-s: stopping")
                    return
                try:
                    if not train(run, run_dir, deadline):
                        return  # stopped for the deadline: the next call resumes it
                except RunFailed as e:  # the other runs go on; the call ends with this error
                    print(f"study: {e}", flush=True)
                    failed.append(f"{run.study}/{run.name}")
                    continue
                if diverged(run_dir):  # a result too (e.g. a LR too high): archived, go on
                    archive_diverged(run, run_dir, args.results)
                    continue
            finishing.start(finish, run, run_dir, args.results, args.device)


class Background:
    """One job at a time in a thread beside the training subprocess: a run's evaluation and
    analysis (about half a minute on the GPU machine, most of it process start-up and loading)
    overlap the next run's training instead of adding to the call. A job's error is kept, the
    next jobs still run, and ``join`` raises the first one."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []

    def start(self, func: Any, run: Run, *rest: Any) -> None:
        self.wait()  # the previous run's first: one evaluation on the GPU at a time

        def job() -> None:
            try:
                func(run, *rest)
            except BaseException as e:  # SystemExit of a failed `kha-train eval` included
                self.errors.append(f"{run.study}/{run.name}: {type(e).__name__}: {e}")
                print(f"study: finishing {run.study}/{run.name} failed: {e}", flush=True)

        self._thread = threading.Thread(target=job, name=f"finish {run.name}")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def join(self) -> None:
        self.wait()
        if self.errors:
            raise SystemExit("study: evaluating or analysing failed for " + "; ".join(self.errors))


def train(run: Run, run_dir: Path, deadline: float | None) -> bool:
    """Train ``run`` (resuming its checkpoint): True once it ended, trained to the end or
    diverged; False if stopped for the deadline."""
    cmd = [sys.executable, "-m", "kha_train.cli", "train", *run.train_args(run_dir)]
    print(f"study: training {run.study}/{run.name}: {' '.join(cmd[3:])}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "train.log").open("a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        stopped = False
        while proc.poll() is None:
            time.sleep(POLL_S)
            if not stopped and deadline is not None and time.monotonic() > deadline - SAVE_MARGIN_S:
                print(f"study: deadline near: SIGTERM to the trainer (pid {proc.pid})", flush=True)
                proc.send_signal(signal.SIGTERM)  # the trainer's own pid: it saves and exits
                stopped = True
            if stopped and deadline is not None and time.monotonic() > deadline + 30:
                proc.kill()
                break
        code = proc.wait()
    if stopped:  # saved and exited 0; or stopped before it could install its handler: resume
        return trained(run_dir)
    if diverged(run_dir):
        return True
    if code != 0 and not trained(run_dir):  # a crash (not one in teardown, after the end
        # record): marked, so that later calls pass it by until it is looked at
        tail = (run_dir / "train.log").read_text(errors="replace").splitlines()[-15:]
        (run_dir / FAILED_FILE).write_text(f"exit {code}\n" + "\n".join(tail) + "\n")
        raise RunFailed(f"{run.study}/{run.name} failed (exit {code}):\n" + "\n".join(tail))
    return trained(run_dir)


class RunFailed(Exception):
    """The trainer of a run exited with an error (not a divergence, not the deadline)."""


def finish(run: Run, run_dir: Path, results: Path, device: str) -> None:
    """Evaluate and analyse a trained run, then archive what the report needs."""
    from analyze import analyze_run

    out = archive_dir(results, run)
    out.mkdir(parents=True, exist_ok=True)
    eval_json = run_dir / "eval.json"
    if not eval_json.is_file():
        cmd = [sys.executable, "-m", "kha_train.cli", "eval", str(run_dir), "--json",
               str(eval_json), "--device", device]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=REPO)
    analysis = analyze_run(run_dir, out / "kha.npz", device)
    records = archive_records(run_dir, out)
    shutil.copy(eval_json, out / "eval.json")
    summary = summarize(run, records, json.loads(eval_json.read_text()), analysis)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "results.json")  # written last: its presence marks the run done
    print(f"study: {run.study}/{run.name} done: {json.dumps(summary['final'])}", flush=True)


def summarize(
    run: Run,
    records: list[dict[str, Any]],
    report: dict[str, Any] | None,
    analysis: dict[str, Any],
) -> dict[str, Any]:
    """The run's results.json; ``report`` (`kha-train eval`'s) is None for a diverged run."""
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    end = [r for r in records if r.get("type") == "end"][-1]
    tail = train[-10:]
    maxvio = [r["moe_max_violation_mean"] for r in train if "moe_max_violation_mean" in r]
    speed = [r["tokens_per_s"] for r in train[len(train) // 2 :] if "tokens_per_s" in r]
    val_split = (
        next(s for s in report["sources"] if s["name"] == "val") if report is not None else None
    )
    return {
        "study": run.study,
        "run": run.name,
        "variant": run.variant,
        "seed": run.seed,
        "overrides": run.overrides,
        "status": end.get("status", "completed"),
        "final": {
            "eval_loss": val_split["loss"] if val_split else None,
            "eval_bpb": val_split["bpb"] if val_split else None,
            "val_loss": val[-1]["val_loss"] if val else None,
            "train_loss_last100": sum(r["loss"] for r in tail) / max(len(tail), 1),
        },
        "steps": end["step"],
        "tokens": end["tokens_seen"],
        "spikes": end.get("spikes_total", 0),
        "nonfinite_skipped": end.get("nonfinite_skipped", 0),
        "defenses": defenses(records, end),
        "max_violation_max": max(maxvio, default=None),
        "max_violation_last": maxvio[-1] if maxvio else None,
        "tokens_per_s": sorted(speed)[len(speed) // 2] if speed else None,
        "eval": {k: val_split[k] for k in ("docs", "tokens", "bytes", "loss", "bpb")}
        if val_split
        else None,
        "analysis": analysis,
        "environment": _environment(),
    }


def defenses(records: list[dict[str, Any]], end: dict[str, Any]) -> dict[str, Any]:
    """What the spike defenses did (optim.skip_step, train.rollback): updates skipped, rollbacks,
    steps trained and then discarded by them (compute spent twice), and batches of data skipped."""
    rollbacks = [r for r in records if r.get("type") == "rollback"]
    return {
        "spike_skipped": end.get("spike_skipped", 0),
        "rollbacks": len(rollbacks),
        "steps_redone": sum(r["from_step"] - r["to_step"] for r in rollbacks),
        "data_steps_skipped": sum(
            r["skipped_steps"][1] - r["skipped_steps"][0] + 1 for r in rollbacks
        ),
    }


def _environment() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
    commit = os.environ.get("KHA_COMMIT")  # set where the tree is a copy without .git
    if not commit:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True)  # fmt: skip
        commit = git.stdout.strip() or "unknown"
    out["commit"] = commit
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from report import write_report

    for study_file in args.studies:
        name, runs, spec = load_study(Path(study_file))
        done = [archive_dir(args.results, r) for r in runs if is_archived(args.results, r)]
        print(f"{name}: {len(done)} of {len(runs)} runs archived")
        if done:
            write_report(name, spec, done, args.results, borrowed(spec, args.results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("status", cmd_status), ("run", cmd_run), ("report", cmd_report)):
        p = sub.add_parser(name)
        p.add_argument("studies", nargs="+", help="study files, e.g. configs/study/table2.yaml")
        p.add_argument("--runs", type=Path, default=REPO / "runs" / "study")
        p.add_argument("--results", type=Path, default=REPO / "docs" / "results")
        p.set_defaults(func=func)
        if name == "run":
            p.add_argument("--only", nargs="*", help="run names to train (default: all)")
            p.add_argument("--deadline-s", type=float, default=None,
                           help="stop (saving the run in progress) before this many seconds")  # fmt: skip
            p.add_argument("--min-run-s", type=float, default=120.0,
                           help="do not start or resume a run with less time than this left")  # fmt: skip
            p.add_argument("--device", default="auto")
            p.add_argument("--retry-failed", action="store_true",
                           help=f"train runs marked {FAILED_FILE} (their trainer crashed) again")  # fmt: skip
    args = parser.parse_args(argv)
    args.studies = drop_base_configs(args.studies)
    return args.func(args)


def drop_base_configs(paths: list[str]) -> list[str]:
    """The given files less the kha-train configs that other given study files train (their
    ``config:``), so ``configs/study/*.yaml`` names the studies only."""
    bases = set()
    for path in paths:
        spec = yaml.safe_load(Path(path).read_text())
        if isinstance(spec, dict) and "study" in spec and "config" in spec:
            bases.add((Path(path).parent / spec["config"]).resolve())
    return [p for p in paths if Path(p).resolve() not in bases]


if __name__ == "__main__":
    sys.exit(main())
