import math

import numpy as np
import pytest

from pipeline.evaluate.classification import binary_metrics, confusion_matrix, roc_auc


def test_metrics_match_hand_computed_values():
    # labels      1 1 1 1 0 0 0 0 0 0
    # predictions 1 1 1 0 1 0 0 0 0 0  -> tp=3 fn=1 fp=1 tn=5
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    predictions = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.4, 0.05, 0.3]
    m = binary_metrics(labels, predictions, scores)
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    # Pairs (positive, negative): 4 x 6 = 24. Positives 0.9, 0.8, 0.7 beat all 6 negatives (18);
    # 0.3 beats 0.2, 0.1, 0.05 (3) and ties 0.3 (0.5): AUC = 21.5 / 24.
    assert m["roc_auc"] == pytest.approx(21.5 / 24)
    assert confusion_matrix(labels, predictions, 2).tolist() == [[5, 1], [1, 3]]


def test_undefined_precision_is_zero_and_auc_needs_both_classes():
    m = binary_metrics([1, 0, 0], [0, 0, 0], [0.4, 0.1, 0.2])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["roc_auc"] == 1.0
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))
    with pytest.raises(ValueError, match="equally many"):
        binary_metrics([1, 0], [1], [0.5, 0.5])


def test_auc_agrees_with_pairwise_counting_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 20, 200) / 20  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert roc_auc(labels, scores) == pytest.approx(pairwise)
