"""scripts/report.py's comparison with the baseline: seed by seed, on the seeds both have."""

from __future__ import annotations

from script_loader import load_script

_paired = load_script("report")._paired


def _runs(bpb_by_seed: dict[int, float]) -> list[dict]:
    return [{"seed": s, "final": {"eval_bpb": b}} for s, b in bpb_by_seed.items()]


def test_difference_is_paired_by_seed() -> None:
    base = _runs({1: 0.92, 2: 0.93})
    # One seed in common: the difference on that seed, not against the two-seed mean.
    assert _paired(_runs({1: 0.915}), base) == ("-0.0050 (s1)", "n/a (1 seed)")
    # Both seeds better by 0.02, seed spreads 0.01: beyond the spread.
    assert _paired(_runs({1: 0.90, 2: 0.91}), base) == (
        "-0.0200 (s1 -0.0200, s2 -0.0200)",
        "yes; same sign in all 2 seeds",
    )
    # A mean gain of 0.002 against seed spreads of 0.01 and 0.004: not beyond.
    text, beyond = _paired(_runs({1: 0.921, 2: 0.925}), base)
    assert text == "-0.0020 (s1 +0.0010, s2 -0.0050)" and beyond == "no; signs differ"
    # A seed the baseline lacks is left out; with none in common there is no comparison.
    assert _paired(_runs({1: 0.915, 3: 0.80}), base)[0] == "-0.0050 (s1)"
    assert _paired(_runs({3: 0.80}), base) == ("", "")


def test_spikes_of_rolled_back_steps_are_counted_and_drawn(tmp_path) -> None:
    """A rollback restores the run's spike count from its checkpoint, so the spike that
    triggered it lives only in rolled_back.jsonl: the report counts and plots it from there."""
    report = load_script("report")
    train = [{"type": "train", "step": s, "loss": 3.0, "grad_norm": 0.4} for s in (10, 20, 30)]
    nan = {"type": "train", "step": 40, "loss": 3.0, "grad_norm": float("nan")}
    train.append(nan)  # an older archive's record: left out of the log-scale plot
    lost = [{"type": "train", "step": 20, "loss": 3.1, "grad_norm": 2.0, "rolled_back_by": 1},
            {"type": "spike", "step": 18, "loss": 3.2, "grad_norm": 5.0, "rolled_back_by": 1}]  # fmt: skip
    rollback = {"type": "rollback", "step": 10, "from_step": 20, "to_step": 10}
    run = {"run": "rb-s1", "variant": "rb", "spikes": 1, "records": [*train, rollback],
           "rolled_back": lost}  # fmt: skip
    plain = {"run": "plain-s1", "variant": "plain", "spikes": 1, "records": train,
             "rolled_back": []}  # fmt: skip
    assert report._spikes(run) == 2 and report._spikes(plain) == 1
    png = report._grad_norm_plot("s", [run, plain], ["plain", "rb"], tmp_path)
    assert png == tmp_path / "s_grad_norm.png" and png.stat().st_size > 0
