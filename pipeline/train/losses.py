"""Language-model losses shared by the stages (DPO's lives in `dpo.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""Targets with this value (prompt tokens, padding) are not learned."""


def learned_targets(batch: tuple[torch.Tensor, ...]) -> int:
    """How many targets `lm_loss` averages over (its `loss_units` for multi-process training)."""
    return int((batch[1] != IGNORE_INDEX).sum())


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the targets that are not IGNORE_INDEX."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )
