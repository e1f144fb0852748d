"""The loss-spike detector: flags, warmup, non-finite values, checkpointed state."""

from __future__ import annotations

import random

from kha_train.training.spikes import SpikeDetector


def noisy(n: int, seed: int = 0) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    return [(3.0 - 0.001 * i + rng.gauss(0, 0.01), 1.0 + rng.gauss(0, 0.05)) for i in range(n)]


def test_synthetic_spike_is_flagged_with_its_statistics_and_sample_ids() -> None:
    det = SpikeDetector(window=32, z_threshold=6.0, warmup=10)
    series = noisy(60)
    series[40] = (4.0, 9.0)  # a loss spike with a grad-norm spike
    found = []
    for step, (loss, gnorm) in enumerate(series, start=1):
        found += det.observe(step, loss, gnorm, sample_ids=[step * 10, step * 10 + 1])
    assert {(s.step, s.metric) for s in found} == {(41, "loss"), (41, "grad_norm")}
    s = next(s for s in found if s.metric == "loss")
    assert s.value == 4.0 and s.grad_norm == 9.0 and s.loss == 4.0
    assert s.z > 6 and s.ratio > 1.3 and s.sample_ids == [410, 411]
    assert det.num_spikes == 2 and det.spikes_by_metric == {"loss": 1, "grad_norm": 1}
    assert s.to_dict()["type"] == "spike"


def test_nothing_during_warmup_and_non_finite_values_are_not_observed() -> None:
    det = SpikeDetector(window=8, z_threshold=3.0, warmup=5)
    assert det.observe(1, 1.0, 1.0) == [] and det.observe(2, 1.1, 1.0) == []
    assert det.observe(3, 100.0, 1.0) == []  # huge, but still in warmup
    assert det.observe(4, float("nan"), 1.0) == [] and det.observe(5, 1.0, float("inf")) == []
    assert det.state_dict()["seen"] == 3  # the non-finite steps were not added to the windows


def test_state_round_trip_continues_identically() -> None:
    series = noisy(80, seed=1)
    series[50] = (5.0, 1.0)
    series[70] = (series[70][0], 20.0)
    straight = SpikeDetector(window=16, z_threshold=5.0, warmup=8)
    first = SpikeDetector(window=16, z_threshold=5.0, warmup=8)
    out_straight = [straight.observe(i, *v) for i, v in enumerate(series)]
    out_first = [first.observe(i, *v) for i, v in enumerate(series[:40])]
    resumed = SpikeDetector(window=16, z_threshold=5.0, warmup=8)
    resumed.load_state_dict(first.state_dict())
    out_resumed = [resumed.observe(i + 40, *v) for i, v in enumerate(series[40:])]
    assert out_first + out_resumed == out_straight
    assert resumed.state_dict() == straight.state_dict()
    assert straight.num_spikes == 2
