import math

import pytest

from pipeline.settings import TrainSettings
from pipeline.train import lr_at


def cfg(**kw) -> TrainSettings:
    base = {"max_steps": 110, "batch_size": 2, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10}
    return TrainSettings(**{**base, **kw})


def test_warmup_is_linear_from_zero_to_peak():
    c = cfg()
    assert lr_at(0, c) == 0.0
    assert lr_at(5, c) == pytest.approx(0.5e-3)
    assert lr_at(10, c) == pytest.approx(1e-3)


def test_cosine_midpoint_and_minimum_at_end():
    c = cfg()
    assert lr_at(60, c) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(110, c) == pytest.approx(1e-4)
    assert lr_at(500, c) == pytest.approx(1e-4)
    values = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_no_warmup_starts_at_peak():
    c = cfg(warmup_steps=0)
    assert lr_at(0, c) == pytest.approx(1e-3)
    assert lr_at(55, c) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
