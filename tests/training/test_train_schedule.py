"""Learning-rate schedules: warmup, cosine to the floor, constant, warmup-stable-decay."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from kha_train.config import ScheduleConfig, ScheduleKind
from kha_train.training.schedule import lr_at, warmup_steps

PEAK = 1e-3


def curve(cfg: ScheduleConfig, total: int) -> list[float]:
    return [lr_at(s, peak_lr=PEAK, total_steps=total, cfg=cfg) for s in range(total)]


def test_cosine_paper_schedule_warmup_then_floor() -> None:
    cfg = ScheduleConfig(kind=ScheduleKind.cosine, warmup_fraction=0.05, min_lr_ratio=0.1)
    lrs = curve(cfg, 1000)
    assert warmup_steps(cfg, 1000) == 50
    assert lrs[0] == pytest.approx(PEAK / 50)
    assert lrs[49] == pytest.approx(PEAK)  # the last warmup step reaches the peak
    assert all(a < b for a, b in pairwise(lrs[:50]))  # strictly rising warmup
    assert all(a >= b for a, b in pairwise(lrs[49:]))  # then never rising
    assert lrs[-1] == pytest.approx(0.1 * PEAK)  # floor on the last step
    mid = 50 + (999 - 50) // 2
    assert lrs[mid] == pytest.approx(0.55 * PEAK, rel=1e-2)  # halfway down the cosine
    # Past the planned end the schedule stays at the floor.
    assert lr_at(1500, peak_lr=PEAK, total_steps=1000, cfg=cfg) == pytest.approx(0.1 * PEAK)


def test_constant_and_warmup_steps_override() -> None:
    cfg = ScheduleConfig(kind=ScheduleKind.constant, warmup_steps=4, warmup_fraction=0.5)
    lrs = curve(cfg, 20)
    assert lrs[:4] == pytest.approx([PEAK / 4, PEAK / 2, 3 * PEAK / 4, PEAK])
    assert lrs[4:] == pytest.approx([PEAK] * 16)


def test_wsd_stable_then_linear_decay() -> None:
    cfg = ScheduleConfig(
        kind=ScheduleKind.wsd, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0
    )
    lrs = curve(cfg, 100)
    assert lrs[9] == pytest.approx(PEAK)
    assert lrs[10:80] == pytest.approx([PEAK] * 70)  # stable until the last 20%
    decay = lrs[80:]
    assert decay[0] < PEAK and decay[-1] == pytest.approx(0.0, abs=1e-15)
    steps = [a - b for a, b in pairwise(decay)]
    assert steps == pytest.approx([steps[0]] * len(steps))  # linear


def test_wsd_without_decay_phase_and_no_warmup() -> None:
    cfg = ScheduleConfig(kind=ScheduleKind.wsd, warmup_fraction=0.0, decay_fraction=0.0)
    assert curve(cfg, 10) == pytest.approx([PEAK] * 10)
    cos = ScheduleConfig(kind=ScheduleKind.cosine, warmup_fraction=0.0, min_lr_ratio=0.0)
    lrs = curve(cos, 11)
    assert lrs[0] == pytest.approx(PEAK)
    assert lrs[5] == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 0.5)))
