"""Probability calibration: temperature scaling and expected calibration error (Guo et al., 2017).

A classifier trained to a near-zero loss says 1.0000 for almost everything; dividing its logits
by one scalar T > 0, fitted on held-out data, keeps every prediction (the argmax) and the ranking
(ROC-AUC) and makes the probabilities mean what they say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import InputError

ECE_BINS = 15
"""Equal-width confidence bins, as Guo et al. report ECE."""
LOG_T_BOUNDS = (math.log(1e-2), math.log(1e3))
"""Search range of log T. The NLL is unimodal in log T, so a golden-section search finds its
minimum; on validation data the model separates perfectly it sits at the lower bound."""


def temperature_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: Sequence[int], tol: float = 1e-6) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) (a bounded 1-D golden-section
    search on log T: deterministic, no learning rate to tune)."""
    logits = torch.as_tensor(logits).detach().double().cpu()
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if logits.ndim != 2 or len(logits) != len(y) or len(y) == 0:
        raise InputError(
            f"logits of shape {tuple(logits.shape)} for {len(y)} labels; need (N, classes) "
            "logits and N labels, N > 0"
        )

    def nll(log_t: float) -> float:
        return temperature_nll(logits, y, math.exp(log_t))

    ratio = (math.sqrt(5) - 1) / 2
    lo, hi = LOG_T_BOUNDS
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


@dataclass(frozen=True)
class ReliabilityBins:
    """Per equal-width confidence bin: mean confidence, accuracy and count (empty bins: NaN, 0)."""

    confidence: np.ndarray
    accuracy: np.ndarray
    counts: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of |accuracy − confidence| · share."""
        used = self.counts > 0
        gaps = np.abs(self.accuracy[used] - self.confidence[used])
        return float((gaps * self.counts[used]).sum() / self.counts.sum())


def reliability_bins(probs: torch.Tensor, labels: Sequence[int], bins: int = ECE_BINS
                     ) -> ReliabilityBins:  # fmt: skip
    """Predictions grouped by confidence (the top probability) into `bins` equal-width bins
    (lo, hi], each with how often its predictions were right."""
    p = np.asarray(torch.as_tensor(probs).double().cpu())
    y = np.asarray(list(labels))
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0:
        raise InputError(
            f"probabilities of shape {p.shape} for {len(y)} labels; need (N, classes) "
            "probabilities and N labels, N > 0"
        )
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, bins) / counts
        accuracy = np.bincount(index, correct, bins) / counts
    return ReliabilityBins(mean_confidence, accuracy, counts)


def expected_calibration_error(probs: torch.Tensor, labels: Sequence[int],
                               bins: int = ECE_BINS) -> float:  # fmt: skip
    """ECE over `bins` equal-width confidence bins (Guo et al., 2017, eq. 3)."""
    return reliability_bins(probs, labels, bins).ece
