"""Language-model losses shared by the stages (DPO's lives in `dpo.py`)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.head_loss import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "learned_targets", "lm_loss"]


def learned_targets(batch: tuple[torch.Tensor, ...]) -> int:
    """How many targets `lm_loss` averages over (its `loss_units` for multi-process training)."""
    return int((batch[1] != IGNORE_INDEX).sum())


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the targets that are not IGNORE_INDEX (NaN if
    none is), by the GPT's fused head (`GPT.head_loss`: no logits are materialised)."""
    inputs, targets = batch
    return model(inputs, targets=targets)
