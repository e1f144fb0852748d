"""Console line, JSONL (cut back on resume), W&B mode choice and failure handling, loss plot."""

from __future__ import annotations

import io
import json
import sys
import types
from pathlib import Path

import pytest

from kha_train.config import WandbMode
from kha_train.training.loggers import ConsoleLogger, JsonlLogger, format_record, read_jsonl
from kha_train.training.plot import plot_loss
from kha_train.training.wandb_log import STEP_KEY, WandbLogger, resolve_wandb_mode


def test_jsonl_fresh_run_starts_over_and_resume_drops_replayed_steps(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = JsonlLogger(path)
    for step in range(1, 6):
        log.write({"type": "train", "step": step, "loss": 1.0 / step})
    log.write({"type": "val", "step": 5, "val_loss": float("nan")})
    log.close()
    with open(path, "a") as f:
        f.write('{"type": "train", "st')  # a line cut by a crash
    # Resuming from the checkpoint of step 3: steps 4 and 5 will be trained (and logged) again.
    log = JsonlLogger(path, keep_until_step=3)
    log.write({"type": "train", "step": 4, "loss": 0.3})
    log.close()
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["loss"] == 0.3
    assert JsonlLogger(path).path.read_text() == ""  # a fresh run: new file
    log = JsonlLogger(tmp_path / "x.jsonl")
    log.write({"step": 1, "v": float("inf")})
    log.close()
    assert json.loads((tmp_path / "x.jsonl").read_text())["v"] == "inf"  # strict JSON


def test_console_line_has_the_metrics_and_eta() -> None:
    rec = {
        "type": "train", "step": 50, "loss": 3.21, "grad_norm": 0.8, "lr": 3e-4,
        "tokens_per_s": 45200.0, "mfu": 0.412, "mem_peak_alloc_gib": 40.1, "eta_s": 3723,
        "moe_max_violation_mean": 0.25, "nonfinite_skipped": 2, "spikes_total": 1,
    }  # fmt: skip
    line = format_record(rec, 1000)
    for piece in ("step   50/1000", "loss 3.2100", "gnorm 0.800", "lr 3.00e-04", "45.2k tok/s",
                  "mfu 41.2%", "mem 40.1 GiB", "maxvio 0.25", "skipped 2", "spikes 1", "eta 1h02m"):  # fmt: skip
        assert piece in line, (piece, line)
    out = io.StringIO()
    console = ConsoleLogger(total_steps=10, start_step=0, stream=out, bar=False)
    console.log({"type": "val", "step": 10, "val_loss": 2.5})
    assert out.getvalue().strip() == "step 10/10 | val_loss 2.5000"


def test_wandb_auto_mode_is_offline_without_an_api_key(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode(WandbMode.auto) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert resolve_wandb_mode(WandbMode.auto) == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolve_wandb_mode(WandbMode.auto) == "online"
    assert resolve_wandb_mode(WandbMode.disabled) == "disabled"


class FakeRun:
    def __init__(self, fail_log: bool) -> None:
        self.fail_log, self.logged, self.summary = fail_log, [], {}

    def log(self, data, step=None):
        if self.fail_log:
            raise ConnectionError("network is unreachable")
        assert step is None  # W&B's own step only goes forward: the trainer's is a value
        self.logged.append((data[STEP_KEY], data))

    def define_metric(self, name, step_metric=None):
        self.summary.setdefault("_defined", []).append((name, step_metric))

    def finish(self, exit_code=0):
        pass


def fake_wandb(monkeypatch, init) -> None:
    module = types.SimpleNamespace(
        init=init,
        Table=lambda columns, data: ("table", columns, list(data)),
    )
    monkeypatch.setitem(sys.modules, "wandb", module)


def make_logger(tmp_path: Path, mode: str = "offline") -> tuple[WandbLogger, io.StringIO]:
    out = io.StringIO()
    console = ConsoleLogger(1, 0, stream=out, bar=False)
    logger = WandbLogger(
        mode=mode, project="p", entity=None, name="n", run_dir=tmp_path, config={},
        info=console.info, resume=False,
    )  # fmt: skip
    return logger, out


def test_wandb_failure_is_reported_once_and_never_raises(tmp_path, monkeypatch) -> None:
    run = FakeRun(fail_log=True)
    fake_wandb(monkeypatch, lambda **kw: run)
    logger, out = make_logger(tmp_path)
    for step in range(3):
        logger.log(step, {"step": step, "loss": 1.0})
        logger.log_spikes(step, [{"step": step, "metric": "loss", "value": 1.0, "z": 9.0,
                                  "ratio": 2.0, "loss": 1.0, "grad_norm": 1.0, "sample_ids": [1]}], 1)  # fmt: skip
    logger.finish()
    text = out.getvalue()
    assert text.count("warning: W&B failed") == 1 and "network is unreachable" in text
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum()

    def broken_init(**kw):
        raise RuntimeError("wandb is broken")

    fake_wandb(monkeypatch, broken_init)
    logger, out = make_logger(tmp_path)
    logger.log(1, {"loss": 1.0})
    logger.summary({"x": 1})
    logger.finish()
    assert out.getvalue().count("warning: W&B failed during start") == 1


def test_wandb_online_start_failure_falls_back_to_offline(tmp_path, monkeypatch) -> None:
    modes = []

    def init(mode, **kw):
        modes.append(mode)
        if mode == "online":
            raise TimeoutError("no network")
        return FakeRun(fail_log=False)

    fake_wandb(monkeypatch, init)
    logger, out = make_logger(tmp_path, mode="online")
    logger.log(3, {"type": "train", "step": 3, "loss": 2.0, "moe_dead": [0, 1]})
    assert modes == ["online", "offline"] and logger.mode == "offline"
    assert logger.run.logged == [(3, {"train/loss": 2.0, "train/moe_dead/layer_0": 0.0,
                                      "train/moe_dead/layer_1": 1.0, STEP_KEY: 3})]  # fmt: skip
    assert "logging offline" in out.getvalue()


def test_loss_plot_marks_spikes(tmp_path: Path) -> None:
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 21):
        log.write({"type": "train", "step": step, "loss": 5.0 - 0.1 * step})
    log.write({"type": "val", "step": 20, "val_loss": 3.2})
    log.write({"type": "spike", "step": 7, "loss": 6.0, "metric": "loss"})
    log.write({"type": "nonfinite", "step": 9, "loss": "nan"})
    log.close()
    png = plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss(tmp_path / "missing.jsonl", tmp_path / "none.png") is None


@pytest.fixture(autouse=True)
def _no_real_wandb_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path: Path) -> None:
    from kha_train.config import ConfigError
    from kha_train.training.loggers import TensorBoardLogger

    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'kha-train\[tensorboard\]'"):
            TensorBoardLogger(tmp_path / "tb")
        return
    tb = TensorBoardLogger(tmp_path / "tb")  # installed: it writes event files
    tb.log(1, {"type": "train", "step": 1, "loss": 2.0})
    tb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_wandb_starts_only_with_the_first_metric(tmp_path, monkeypatch) -> None:
    started = []
    fake_wandb(monkeypatch, lambda **kw: started.append(kw) or FakeRun(fail_log=False))
    logger, out = make_logger(tmp_path)
    logger.summary({"status": "completed"})  # a run with nothing to do: summary and finish only
    logger.finish()
    assert started == [] and out.getvalue() == "" and not (tmp_path / "wandb_run_id").exists()
    logger.log(1, {"loss": 1.0})
    assert len(started) == 1


def test_real_offline_wandb_prints_two_lines_and_how_to_sync(tmp_path, capfd) -> None:
    pytest.importorskip("wandb")
    logger, out = make_logger(tmp_path)
    logger.log(1, {"type": "train", "step": 1, "loss": 2.0})
    logger.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("W&B: offline run "), lines
    assert "wandb sync " in lines[1] and str(tmp_path / "wandb" / "offline-run-") in lines[1]
    captured = capfd.readouterr()
    assert "wandb" not in (captured.out + captured.err).lower()  # W&B's own output is silenced


def test_heartbeat_names_the_activity_when_the_console_is_quiet() -> None:
    import time

    out = io.StringIO()
    console = ConsoleLogger(10, 0, stream=out, bar=False, heartbeat_s=0.3)
    try:
        console.advance(4)
        console.activity("saving checkpoint step 4")
        deadline = time.monotonic() + 10
        while "saving checkpoint" not in out.getvalue():
            assert time.monotonic() < deadline, "no heartbeat line within 10 s"
            time.sleep(0.05)
        assert "... saving checkpoint step 4 for " in out.getvalue()
        assert "(step 4/10 done)" in out.getvalue()
    finally:
        console.close()
    quiet = ConsoleLogger(10, 0, stream=io.StringIO(), bar=False, heartbeat_s=None)
    assert quiet._heartbeat is None


def test_a_full_disk_while_logging_is_one_storage_error_naming_the_file(tmp_path) -> None:
    import errno

    from kha_train.fs import StorageError

    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.write({"type": "train", "step": 1, "loss": 1.0})

    class FullDisk(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    log._f = FullDisk()
    with pytest.raises(StorageError) as e:
        log.write({"type": "train", "step": 2, "loss": 1.0})
    msg = str(e.value)
    assert f"could not write the log {tmp_path / 'metrics.jsonl'}: No space left" in msg
    assert "Fix: free space" in msg
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1  # earlier lines kept


def test_wandb_x_axis_is_the_trainer_step_so_steps_trained_again_are_kept(
    tmp_path, monkeypatch
) -> None:
    """A resume or a rollback trains steps again; W&B keeps them since its x axis is the
    trainer's step logged as a value (W&B drops a step= below its last one)."""
    run = FakeRun(fail_log=False)
    fake_wandb(monkeypatch, lambda **kw: run)
    logger, _ = make_logger(tmp_path)
    for step in (1, 2, 3, 2, 3, 4):  # rolled back to step 1 after step 3
        logger.log(step, {"type": "train", "step": step, "loss": 1.0 / step})
    assert [s for s, _ in run.logged] == [1, 2, 3, 2, 3, 4]
    assert run.logged[3][1]["train/loss"] == 0.5
    assert run.summary["_defined"] == [(STEP_KEY, None), ("*", STEP_KEY)]


def test_real_offline_wandb_takes_steps_logged_again(tmp_path, capfd) -> None:
    pytest.importorskip("wandb")
    logger, out = make_logger(tmp_path)
    for step in (1, 2, 3, 2, 3):
        logger.log(step, {"type": "train", "step": step, "loss": 1.0})
    assert logger.run is not None and "warning" not in out.getvalue()
    logger.finish()
