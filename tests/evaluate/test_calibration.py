import math

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.evaluate.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def sampled_labels(logits: torch.Tensor, temperature: float, seed: int = 0) -> torch.Tensor:
    """Labels drawn from softmax(logits / temperature): data for which that T is the truth."""
    generator = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]


@pytest.mark.parametrize("true_t", [0.5, 1.0, 3.0])
def test_fitted_temperature_recovers_the_one_that_generated_the_labels(true_t):
    logits = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(1)) * 4
    labels = sampled_labels(logits, true_t)
    assert fit_temperature(logits, labels.tolist()) == pytest.approx(true_t, rel=0.05)


def test_calibration_lowers_the_ece_of_over_confident_logits():
    logits = torch.randn(5_000, 2, generator=torch.Generator().manual_seed(2)) * 3
    labels = sampled_labels(logits, 4.0).tolist()  # the model is 4x too sure of itself
    over_confident = expected_calibration_error(torch.softmax(logits, -1), labels)
    t = fit_temperature(logits, labels)
    calibrated = expected_calibration_error(torch.softmax(logits / t, -1), labels)
    assert over_confident > 0.15 and calibrated < 0.03


def test_ece_matches_a_hand_computed_case():
    # confidences 0.9 (right) and 0.91 (wrong) share the bin (0.8667, 0.9333]: mean confidence
    # 0.905, accuracy 0.5; 0.7 (right) is alone in (0.6667, 0.7333]. Empty bins count nothing.
    probs = torch.tensor([[0.9, 0.1], [0.09, 0.91], [0.3, 0.7]])
    labels = [0, 0, 1]
    expected = (2 * abs(0.5 - 0.905) + abs(1 - 0.7)) / 3  # = 0.37
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    bins = reliability_bins(probs, labels)
    assert bins.counts.tolist() == [0] * 10 + [1, 0, 0, 2, 0]
    assert bins.accuracy[13] == 0.5 and bins.confidence[13] == pytest.approx(0.905)
    assert math.isnan(bins.accuracy[0])


def test_a_perfectly_calibrated_bin_has_no_error():
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, [0, 0, 0, 1]) == pytest.approx(0.0)


def test_mismatched_inputs_are_refused():
    with pytest.raises(InputError, match="2 labels"):
        fit_temperature(torch.zeros(3, 2), [0, 1])
    with pytest.raises(InputError, match="for 0 labels"):
        reliability_bins(np.zeros((0, 2)), [])
