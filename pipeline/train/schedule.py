"""Learning-rate schedule shared by every training stage."""

from __future__ import annotations

import math

from pipeline.settings import TrainSettings


def lr_at(step: int, cfg: TrainSettings) -> float:
    """Learning rate for optimizer step ``step`` (1-based in ``fit``; 0 is the warmup start).

    Linear warmup from 0 to ``cfg.lr`` over ``cfg.warmup_steps``, then cosine decay to
    ``cfg.min_lr`` at ``cfg.max_steps``; constant ``min_lr`` beyond. Warmup avoids the large,
    badly-directed first Adam updates; the cosine tail lets the loss settle. `fit` gives each
    parameter group this rate times its ``lr_scale`` (1, or ``muon_lr / lr`` for Muon's group).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
