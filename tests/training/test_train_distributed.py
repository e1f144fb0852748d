"""Multi-process behaviour through real launches (torchrun on gloo, subprocesses): 2 ranks vs 1,
resume across rank counts, HSDP, preemption signals, kill -9 during a save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import (
    REPO,
    losses,
    records,
    run_process,
    subprocess_env,
    tiny_config,
    torchrun_cmd,
    train_here,
    write_config,
)

from kha_train.training.checkpoint import MARKER, latest_checkpoint

pytestmark = pytest.mark.slow

# A constant schedule after warmup makes runs of different planned lengths comparable.
SCHEDULE = {"kind": "constant", "warmup_steps": 2}
TOL = 1e-5  # fp32: the sum over ranks runs in another order than the sum over micro-batches


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset) -> Path:
    """One rank, 6 steps, checkpoints at 3 and 6, evaluation at 3 and 6."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train_here(tiny_config(run, tiny_dataset, schedule=SCHEDULE, eval=_eval(tiny_dataset)))
    return run


def _eval(dataset: Path) -> dict:
    """In-loop evaluation of the val split: 2 ranks share its batches (one rank runs an empty
    batch when their number is odd)."""
    return {"sets": {"held": str(dataset)}, "every": 3}


def assert_close(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=TOL, abs=TOL), (s, got[s], want[s])


def test_two_ranks_match_one_and_resume_on_one(tmp_path, tiny_dataset, reference) -> None:
    run = tmp_path / "two"
    two_cfg = tiny_config(run, tiny_dataset, schedule=SCHEDULE, eval=_eval(tiny_dataset))
    cfg = write_config(tmp_path / "two.yaml", two_cfg)
    proc = run_process(torchrun_cmd(2, "-m", "kha_train.train", str(cfg)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, ref = losses(run), losses(reference)
    assert sorted(two) == list(range(1, 7))
    # Step 1 depends only on the initial weights and the data: the sharded init on 2 ranks
    # draws exactly the single-device weights.
    assert two[1] == pytest.approx(ref[1], rel=1e-6)
    assert_close(two, ref, range(1, 7))
    evals = [(r["step"], r["held/loss"], r["held/bpb"]) for r in records(run, "eval")]
    ref_evals = [(r["step"], r["held/loss"], r["held/bpb"]) for r in records(reference, "eval")]
    assert [e[0] for e in evals] == [e[0] for e in ref_evals] == [3, 6]
    for got, want in zip(evals, ref_evals):
        assert got == pytest.approx(want, rel=TOL, abs=TOL)
    # The KHA drift, gathered from the shards of 2 ranks, is the single-device figure.
    drift = [r["kha_drift"] for r in records(run) if r.get("step") == 6]
    ref_drift = [r["kha_drift"] for r in records(reference) if r.get("step") == 6]
    assert len(drift) == len(ref_drift) == 1 and len(drift[0]) == 2 and min(drift[0]) > 0
    assert drift[0] == pytest.approx(ref_drift[0], rel=1e-3, abs=1e-6)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000003",
        "step_0000006",
    ]
    # Resume the 2-rank checkpoint of step 3 on 1 rank: the same steps 4..6.
    one = tmp_path / "one"
    ckpt = run / "checkpoints" / "step_0000003"
    train_here(tiny_config(one, tiny_dataset, schedule=SCHEDULE, checkpoint={"resume": str(ckpt)}))
    assert_close(losses(one), ref, range(4, 7))


def test_deferred_gradient_sync_on_two_ranks_matches_one_rank(
    tmp_path, tiny_dataset, reference
) -> None:
    """parallel.defer_grad_sync: parameters stay gathered and gradients unsharded over each
    rank's 2 micro-batches, reduced once per step; the same training as one rank."""
    run = tmp_path / "deferred"
    cfg = tiny_config(run, tiny_dataset, schedule=SCHEDULE, parallel={"defer_grad_sync": True})
    proc = run_process(
        torchrun_cmd(2, "-m", "kha_train.train", str(write_config(tmp_path / "d.yaml", cfg)))
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_close(losses(run), losses(reference), range(1, 7))


def worker_pids(torchrun: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    out = {}
    for pid in subprocess.run(
        ["ps", "--ppid", str(torchrun.pid), "-o", "pid="], capture_output=True, text=True
    ).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            out[int(rank[0][5:])] = int(pid)
    return out


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (run / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(run)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{run} never reached step {step}")


def test_hsdp_resumed_from_one_rank_stops_on_sigusr1_to_one_rank(
    tmp_path, tiny_dataset, reference
) -> None:
    """1 -> 2 ranks resume on a 2 x 1 HSDP mesh; SIGUSR1 to rank 1 only stops both ranks after
    the same step, with a checkpoint, exit 0."""
    run = tmp_path / "hsdp"
    ckpt = reference / "checkpoints" / "step_0000003"
    cfg = tiny_config(
        run, tiny_dataset, schedule=SCHEDULE, train={"max_steps": 100000},
        parallel={"dp_replicate": 2}, checkpoint={"resume": str(ckpt), "every_steps": 0},
    )  # fmt: skip
    path = write_config(tmp_path / "hsdp.yaml", cfg)
    proc = subprocess.Popen(
        torchrun_cmd(2, "-m", "kha_train.train", str(path)), cwd=REPO, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_step(run, 6, proc)
        pids = worker_pids(proc)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert_close(losses(run), losses(reference), range(4, 7))
    last = max(losses(run))
    (end,) = records(run, "end")
    assert end["status"] == "preempted" and end["step"] == last
    assert latest_checkpoint(run / "checkpoints").name == f"step_{last:07d}"


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path, tiny_dataset) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, train={"max_steps": 100000}, checkpoint={"every_steps": 0})
    path = write_config(tmp_path / "run.yaml", cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kha_train.train", str(path)], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for_step(run, 2, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested (SIGTERM)" in err
    last = max(losses(run))
    assert latest_checkpoint(run / "checkpoints").name == f"step_{last:07d}"
    assert records(run, "end")[0]["status"] == "preempted"


SLOW_PUBLISH = """
import sys, time
from pathlib import Path
from kha_train.training import checkpoint as C

publish = C.CheckpointManager._publish

def slow_publish(self, tmp, final):
    if final.name == "step_0000004":  # the second save: every file written, not yet published
        Path(sys.argv[2]).write_text("saving")
        time.sleep(300)
    publish(self, tmp, final)

C.CheckpointManager._publish = slow_publish
from kha_train.training.commands import run
sys.exit(run(sys.argv[1]))
"""


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(
    tmp_path, tiny_dataset
) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(run, tiny_dataset, train={"max_steps": 6}, checkpoint={"every_steps": 2})
    path = write_config(tmp_path / "run.yaml", cfg)
    driver = tmp_path / "driver.py"
    driver.write_text(SLOW_PUBLISH)
    sentinel = tmp_path / "saving"
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(path), str(sentinel)], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        end = time.time() + 120
        while not sentinel.exists():
            assert proc.poll() is None and time.time() < end, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = run / "checkpoints"
    assert (ckpts / "step_0000004.tmp").is_dir() and not (
        ckpts / "step_0000004.tmp" / MARKER
    ).exists()
    assert latest_checkpoint(ckpts).name == "step_0000002"
    # The restart resumes from step 2 and finishes; the half-written save is gone.
    cfg["checkpoint"]["resume"] = "auto"
    train_here(cfg)
    assert sorted(losses(run)) == list(range(1, 7))
    assert not (ckpts / "step_0000004.tmp").exists()
    assert latest_checkpoint(ckpts).name == "step_0000006"
