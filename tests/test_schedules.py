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
