"""scripts/study.py's study-file handling without training: borrowed runs of another study,
the base config dropped from a glob, and bad borrow entries refused."""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from script_loader import load_script

REPO = Path(__file__).resolve().parents[2]


def _study_module():
    return load_script("study")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _files(root: Path, borrow: dict) -> tuple[Path, Path, Path]:
    base = _write(root / "model.yaml", {"model": {"hidden_size": 32}})
    first = _write(root / "first.yaml", {"study": "first", "config": "model.yaml", "seeds": [1, 2],
                                         "variants": {"baseline": {}, "other": {}}})  # fmt: skip
    second = _write(root / "second.yaml", {"study": "second", "config": "model.yaml",
                                           "seeds": [1, 2], "borrow": borrow,
                                           "variants": {"fast": {"optim.lr": 1.0e-2}}})  # fmt: skip
    return base, first, second


def test_borrowed_runs_are_the_archived_seeds_of_the_other_study(tmp_path) -> None:
    study = _study_module()
    _, _, second = _files(tmp_path, {"slow": "first/baseline"})
    name, runs, spec = study.load_study(second)
    assert name == "second" and [r.name for r in runs] == ["fast-s1", "fast-s2"]  # not trained
    results = tmp_path / "results"
    archive = results / "first" / "baseline-s1"
    archive.mkdir(parents=True)
    (archive / "results.json").write_text(json.dumps({}))
    (results / "first" / "baseline-s2").mkdir()  # no results.json: not archived
    assert study.borrowed(spec, results) == {archive: "slow"}


@pytest.mark.parametrize(
    "borrow",
    [
        {"slow": "first/missing"},
        {"slow": "nostudy/baseline"},
        {"slow": "first"},
        {"fast": "first/baseline"},
    ],
)
def test_a_bad_borrow_entry_is_refused(tmp_path, borrow) -> None:
    study = _study_module()
    _, _, second = _files(tmp_path, borrow)
    with pytest.raises(SystemExit, match="borrow"):
        study.load_study(second)


@pytest.mark.parametrize(
    "keys",
    [
        {"baseline": "missing"},
        {"baselines": {"fast": "missing"}},
        {"baselines": {"missing": "slow"}},
    ],
)
def test_a_bad_baseline_is_refused(tmp_path, keys) -> None:
    study = _study_module()
    _, _, second = _files(tmp_path, {"slow": "first/baseline"})
    spec = yaml.safe_load(second.read_text())
    _write(second, {**spec, **keys})
    with pytest.raises(SystemExit, match=r"baseline.*needs variants"):
        study.load_study(second)
    _write(second, {**spec, "baselines": {"fast": "slow"}})  # a borrowed label: fine
    assert study.load_study(second)[0] == "second"


def test_the_base_config_of_a_glob_is_not_taken_for_a_study(tmp_path) -> None:
    study = _study_module()
    base, first, second = _files(tmp_path, {})
    paths = [str(p) for p in (first, base, second)]
    assert study.drop_base_configs(paths) == [str(first), str(second)]


def test_defenses_summary_counts_skips_rollbacks_and_redone_steps() -> None:
    study = _study_module()
    records = [
        {"type": "train", "step": 10},
        {"type": "rollback", "step": 100, "from_step": 130, "to_step": 100,
         "skipped_steps": [120, 135]},
        {"type": "rollback", "step": 300, "from_step": 310, "to_step": 300,
         "skipped_steps": [305, 315]},
    ]  # fmt: skip
    end = {"type": "end", "spike_skipped": 4}
    assert study.defenses(records, end) == {
        "spike_skipped": 4, "rollbacks": 2, "steps_redone": 40, "data_steps_skipped": 27,
    }  # fmt: skip


def _write_records(run_dir: Path, losses: list[float], status: str) -> None:
    run_dir.mkdir(parents=True)
    recs = [{"type": "train", "step": i + 1, "loss": x, "tokens_per_s": 1.0}
            for i, x in enumerate(losses)]  # fmt: skip
    recs.append({"type": "end", "status": status, "step": len(losses),
                 "tokens_seen": 8 * len(losses), "spikes_total": 1})  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_a_diverged_run_is_archived_and_reported_not_fatal(tmp_path) -> None:
    study = _study_module()
    _, first, _ = _files(tmp_path, {})
    _, runs, spec = study.load_study(first)
    base, other = runs[0], runs[1]  # baseline-s1, other-s1
    results = tmp_path / "results"
    ok_dir, bad_dir = tmp_path / "runs" / "ok", tmp_path / "runs" / "bad"
    _write_records(ok_dir, [5.0, 4.0, 3.0], "completed")
    _write_records(bad_dir, [5.0, float("nan"), float("nan")], "nonfinite")
    assert study.diverged(bad_dir) and not study.diverged(ok_dir)
    study.archive_diverged(other, bad_dir, results)
    bad = json.loads((results / "first" / "other-s1" / "results.json").read_text())
    assert bad["status"] == "nonfinite" and bad["final"]["eval_bpb"] is None
    report = {"sources": [{"name": "val", "loss": 2.0, "bpb": 0.9, "docs": 1, "tokens": 9,
                           "bytes": 20}]}  # fmt: skip
    ok = study.summarize(base, study._records(ok_dir / "metrics.jsonl"), report, {})
    archive = results / "first" / "baseline-s1"
    archive.mkdir(parents=True)
    (archive / "results.json").write_text(json.dumps(ok))
    (archive / "metrics.jsonl.gz").write_bytes((results / "first/other-s1/metrics.jsonl.gz")
                                               .read_bytes())  # fmt: skip
    from report import write_report  # scripts/ is on sys.path once study.py is loaded

    out = write_report("first", spec, [archive, results / "first" / "other-s1"], results)
    table = out.read_text()
    assert "| baseline | 1 | 0.9000" in table
    assert "| other | 1 (1 diverged) | diverged: nonfinite at step 3 |" in table


def _fake_trainers(
    study, monkeypatch, root: Path, study_file: Path, outcome, finish=None, on_start=None
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """study.py with a fake `kha-train train` whose ``outcome(run name)`` is "completed",
    "nonfinite" (an end record saying so, exit 1, as the trainer) or "crash" (exit 2, no end
    record); ``finish`` (default: note the run's name) in place of the evaluation. Returns the
    run command's arguments and the names of the runs trained and finished, in order."""
    real_popen = subprocess.Popen
    trained: list[str] = []
    finished: list[str] = []

    def fake_trainer(cmd, **kwargs):
        if "kha_train.cli" not in cmd:  # git, for the archive's commit
            return real_popen(cmd, **kwargs)
        run_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("logging.run_dir="))
        name = Path(run_dir).name
        trained.append(name)
        if on_start is not None:
            on_start(name)
        status = outcome(name)
        if status == "crash":
            script = "print('CUDA error: boom'); exit(2)"
        else:
            end = {"type": "end", "status": status, "step": 3, "tokens_seen": 24,
                   "spikes_total": 0}  # fmt: skip
            script = (f"import json, pathlib, sys; p = pathlib.Path({run_dir!r}) / 'metrics.jsonl'; "
                      f"p.write_text(json.dumps({end!r}) + '\\n'); sys.exit({int(status != 'completed')})")  # fmt: skip
        return real_popen([sys.executable, "-c", script], **kwargs)

    monkeypatch.setattr(study.subprocess, "Popen", fake_trainer)
    monkeypatch.setattr(study, "POLL_S", 0.05)
    monkeypatch.setattr(study, "finish", finish or (lambda run, *a: finished.append(run.name)))
    args = argparse.Namespace(studies=[str(study_file)], runs=root / "runs",
                              results=root / "results", only=None, deadline_s=None,
                              min_run_s=0.0, device="cpu", retry_failed=False)  # fmt: skip
    return args, trained, finished


def test_the_run_command_archives_a_diverged_run_and_goes_on(tmp_path, monkeypatch) -> None:
    """cmd_run with a trainer that ends the `other` runs with status nonfinite (exit 1, as the
    trainer does) and the baseline runs completed: every run is handled, none stops the call."""
    study = _study_module()
    _, first, _ = _files(tmp_path, {})  # variants baseline and other, seeds 1 and 2
    args, _, finished = _fake_trainers(
        study, monkeypatch, tmp_path, first,
        lambda name: "nonfinite" if name.startswith("other-") else "completed",
    )  # fmt: skip
    assert study.cmd_run(args) == 0
    assert finished == ["baseline-s1", "baseline-s2"]  # evaluated and archived by finish
    for run in ("other-s1", "other-s2"):
        summary = json.loads((tmp_path / "results" / "first" / run / "results.json").read_text())
        assert summary["status"] == "nonfinite" and summary["final"]["eval_bpb"] is None


def test_a_run_is_evaluated_while_the_next_one_trains(tmp_path, monkeypatch) -> None:
    """cmd_run hands a trained run to a background finisher and trains the next one at once;
    a finisher that fails does not stop the other runs, and the call then ends with its error."""
    study = _study_module()
    _, first, _ = _files(tmp_path, {})  # runs baseline-s1, other-s1, baseline-s2, other-s2
    started: dict[str, threading.Event] = {}
    overlapped, finished = [], []

    def slow_finish(run, *rest):
        nxt = {"baseline-s1": "other-s1", "other-s1": "baseline-s2"}.get(run.name)
        if nxt is not None:  # the next run's trainer starts while this one is being finished
            overlapped.append(started.setdefault(nxt, threading.Event()).wait(timeout=20))
        if run.name == "other-s1":
            raise SystemExit("kha-train eval failed (exit 1)")
        finished.append(run.name)

    args, _, _ = _fake_trainers(
        study, monkeypatch, tmp_path, first, lambda name: "completed", finish=slow_finish,
        on_start=lambda name: started.setdefault(name, threading.Event()).set(),
    )  # fmt: skip
    with pytest.raises(SystemExit, match="first/other-s1: SystemExit: kha-train eval failed"):
        study.cmd_run(args)
    assert overlapped == [True, True]
    assert finished == ["baseline-s1", "baseline-s2", "other-s2"]  # the failure stopped nothing


def test_the_report_compares_a_variant_with_its_own_baseline(tmp_path) -> None:
    """``baselines: {variant: other}`` (e.g. the baseline at the same LR) in the table."""
    study = _study_module()
    _, first, _ = _files(tmp_path, {})
    spec = {**yaml.safe_load(first.read_text()), "seeds": [1],
            "variants": {"baseline": {}, "fast_base": {}, "fast": {}},
            "baselines": {"fast": "fast_base"}}  # fmt: skip
    _write(first, spec)
    _, runs, spec = study.load_study(first)
    archives = []
    for run, bpb in zip(runs, (0.92, 0.90, 0.89)):
        run_dir = tmp_path / "runs" / run.name
        _write_records(run_dir, [5.0, 4.0, 3.0], "completed")
        with (run_dir / "metrics.jsonl").open("a") as f:  # in-loop evaluations at steps 2, 3
            f.writelines(json.dumps({"type": "eval", "step": step, "val/bpb": bpb + x}) + "\n"
                         for step, x in ((2, 0.1), (3, 0.0)))  # fmt: skip
        report = {"sources": [{"name": "val", "loss": 2.0, "bpb": bpb, "docs": 1, "tokens": 9,
                               "bytes": 20}]}  # fmt: skip
        summary = study.summarize(run, study._records(run_dir / "metrics.jsonl"), report, {})
        archive = tmp_path / "results" / "first" / run.name
        archive.mkdir(parents=True)
        (archive / "results.json").write_text(json.dumps(summary))
        (archive / "metrics.jsonl.gz").write_bytes(
            gzip.compress((run_dir / "metrics.jsonl").read_bytes()))  # fmt: skip
        archives.append(archive)
    from report import write_report

    table = write_report("first", spec, archives, tmp_path / "results").read_text()
    assert "| fast_base | 1 | 0.9000 (-) | 2.0000 (-) | -0.0200 (s1) |" in table
    assert "| fast | 1 | 0.8900 (-) | 2.0000 (-) | -0.0100 (s1) vs fast_base |" in table
    assert "| step | fast_base | fast (vs fast_base) |" in table  # the in-loop table
    assert "| 2 | s1 -0.0200 | s1 -0.0100 |" in table and "| 3 | s1 -0.0200 | s1 -0.0100 |" in table


def test_a_crashed_run_is_marked_and_the_others_go_on(tmp_path, monkeypatch, capsys) -> None:
    """A trainer that exits with an error (no end record: a crash, not a divergence) marks its
    run FAILED; the other runs are trained and finished, the call ends with the error, and the
    next call passes the marked run by (not spending GPU time on it again)."""
    study = _study_module()
    _, first, _ = _files(tmp_path, {})  # runs baseline-s1, other-s1, baseline-s2, other-s2
    args, trained, finished = _fake_trainers(
        study, monkeypatch, tmp_path, first,
        lambda name: "crash" if name.startswith("other-") else "completed",
    )  # fmt: skip
    with pytest.raises(SystemExit, match="first/other-s1; first/other-s2"):
        study.cmd_run(args)
    assert trained == ["baseline-s1", "other-s1", "baseline-s2", "other-s2"]
    assert finished == ["baseline-s1", "baseline-s2"]
    marker = tmp_path / "runs/first/other-s1" / study.FAILED_FILE
    assert marker.read_text().startswith("exit 2\n") and "CUDA error: boom" in marker.read_text()

    trained.clear()
    with pytest.raises(SystemExit, match="other-s1 \\(an earlier call"):
        study.cmd_run(args)
    assert trained == []  # the baselines are trained (and finished again: finish is faked)
    study.cmd_status(args)
    assert "failed: see" in capsys.readouterr().out
    args.retry_failed = True  # --retry-failed: the marked runs once more (they crash again)
    with pytest.raises(SystemExit, match="first/other-s1; first/other-s2"):
        study.cmd_run(args)
    assert trained == ["other-s1", "other-s2"] and marker.is_file()


def test_an_archive_keeps_the_rolled_back_records(tmp_path) -> None:
    """archive_records gzips metrics.jsonl and, after rollbacks, rolled_back.jsonl (the spikes
    a rollback abandoned: `kha-train spikes` reads them back from the archive); a line cut by
    a kill is left out, not fatal."""
    study = _study_module()
    run_dir, out = tmp_path / "run", tmp_path / "archive"
    _write_records(run_dir, [5.0, 4.0], "completed")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"type": "train", "st')  # cut by a kill
    (run_dir / "rolled_back.jsonl").write_text(json.dumps({"type": "spike", "step": 2}) + "\n")
    out.mkdir()
    records = study.archive_records(run_dir, out)
    assert [r["type"] for r in records] == ["train", "train", "end"]
    assert study._records(out / "metrics.jsonl.gz") == records
    assert study._records(out / "rolled_back.jsonl.gz") == [{"type": "spike", "step": 2}]
    (run_dir / "rolled_back.jsonl").unlink()  # no rollback: no such file in the archive
    other = tmp_path / "archive2"
    other.mkdir()
    study.archive_records(run_dir, other)
    assert sorted(p.name for p in other.iterdir()) == ["metrics.jsonl.gz"]
