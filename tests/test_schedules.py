"""The learning-rate schedules of the original recipe."""

import math

import pytest

from ettin_train.config.schema import Duration, SchedulerConfig
from ettin_train.schedules import WARMUP_START, lr_multiplier


def test_warmup_stable_decay_as_phase_one_uses_it():
    cfg = SchedulerConfig(name="warmup_stable_decay", warmup=Duration("100tok"), decay=Duration("0tok"), alpha_f=0.02)
    assert lr_multiplier(cfg, 0, 1000) == pytest.approx(WARMUP_START)
    assert lr_multiplier(cfg, 50, 1000) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 100, 1000) == 1.0
    assert lr_multiplier(cfg, 1000, 1000) == 1.0  # no decay inside phase 1


def test_warmup_stable_decay_with_linear_decay_as_the_cross_recipes():
    cfg = SchedulerConfig(name="warmup_stable_decay", warmup=Duration("30ba"), decay=Duration("100ba"), alpha_f=0.02)
    assert lr_multiplier(cfg, 900, 1000) == 1.0
    assert lr_multiplier(cfg, 950, 1000) == pytest.approx(0.51)
    assert lr_multiplier(cfg, 1000, 1000) == pytest.approx(0.02)


@pytest.mark.parametrize("alpha_f", [0.5, 0.04])
def test_one_minus_sqrt_over_the_whole_phase(alpha_f):
    cfg = SchedulerConfig(name="one_minus_sqrt", alpha_f=alpha_f)
    assert lr_multiplier(cfg, 0, 1000) == 1.0
    assert lr_multiplier(cfg, 250, 1000) == pytest.approx(alpha_f + (1 - alpha_f) * (1 - math.sqrt(0.25)))
    assert lr_multiplier(cfg, 1000, 1000) == pytest.approx(alpha_f)


def _original_wsd_decay(t: float, total: float, decay: float, alpha_f: float) -> float:
    """bert24 `WarmupStableDecayScheduler` past its stable part, as written there: it divides by t_decay
    (ZeroDivisionError without a decay) and only floors at 0."""
    fraction = (t - (total - decay)) / decay
    return max(0.0, 1 - fraction * (1 - alpha_f))


@pytest.mark.parametrize("t", [1000, 1001, 1002, 1010, 5000])
def test_a_linear_decay_past_the_budget_keeps_falling_below_alpha_f_as_the_original(t):
    """The clock past the end of the phase (t > total): the original's line goes on below alpha_f, down to 0."""
    cfg = SchedulerConfig(name="warmup_stable_decay", warmup=Duration("30ba"), decay=Duration("100ba"), alpha_f=0.02)
    assert lr_multiplier(cfg, t, 1000) == _original_wsd_decay(t, 1000, 100, 0.02)
    assert 0.0 < lr_multiplier(cfg, 1001, 1000) < 0.02 and lr_multiplier(cfg, 1010, 1000) == 0.0


def test_past_the_budget_one_minus_sqrt_stays_at_alpha_f_and_no_decay_stays_at_one():
    sqrt = SchedulerConfig(name="one_minus_sqrt", alpha_f=0.04)
    assert lr_multiplier(sqrt, 1500, 1000) == pytest.approx(0.04)  # the original floors it at alpha_f
    stable = SchedulerConfig(name="warmup_stable_decay", warmup=Duration("100tok"), decay=Duration("0tok"), alpha_f=0.02)
    with pytest.raises(ZeroDivisionError):  # where the original stops the run
        _original_wsd_decay(1000, 1000, 0, 0.02)
    assert lr_multiplier(stable, 1000, 1000) == lr_multiplier(stable, 1200, 1000) == 1.0  # the stable rate goes on
