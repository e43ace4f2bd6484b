"""The metric that ranks a training stage's models, which the model registry's `@champion`
follows; each stage names its own (pipeline/stages/registry.py) and hands it to tracking."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Headline:
    """The metric that ranks a training stage's models (its metrics.json key): the model
    registry's `@champion` moves only to a version that beats it."""

    metric: str
    higher_is_better: bool = False

    def value(self, metrics: Mapping[str, Any]) -> float:
        """The metric in `metrics`; NaN when it is missing or not a number."""
        value = metrics.get(self.metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return math.nan

    def beats(self, value: float, other: float) -> bool:
        """Whether `value` is strictly better than `other`: NaN never is; anything finite
        beats NaN."""
        if math.isnan(value):
            return False
        if math.isnan(other):
            return True
        return value > other if self.higher_is_better else value < other
