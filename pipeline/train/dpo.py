"""Direct Preference Optimization: the loss on summed response log-probabilities, and its rewards.

Rafailov et al. 2023: with r(y) = β·(log π(y|x) − log π_ref(y|x)) the implicit reward, the loss
is −log σ(r(chosen) − r(rejected)). Label smoothing ε (conservative DPO) assumes a fraction ε of
the preference labels are flipped; IPO (Azar et al. 2023) regresses the log-ratio margin onto
1/(2β) instead, which does not push it to infinity on separable data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import InputError

LOSS_TYPES = ("sigmoid", "ipo")


def response_logprobs(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum over each row of log p(target) at the positions whose target is not ignored: the
    log-probability of the response alone (prompt and padding are masked in `targets`)."""
    mask = targets != ignore_index
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def model_response_logprobs(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """`response_logprobs` of a GPT's output by its fused head (`GPT.head_loss`): only the
    learned positions reach the vocabulary-wide head, and no logits are materialised."""
    return model(inputs, targets=targets, reduction="none").sum(-1)


def preference_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss over the batch and the statistics logged beside it.

    Inputs are (B,) summed response log-probabilities. Rewards are β·(policy − reference); the
    accuracy is the share of pairs whose chosen reward beats the rejected one.
    """
    if beta <= 0:
        raise InputError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise InputError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    margin = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(
            beta * margin
        ) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise InputError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    chosen_reward = (beta * chosen_logratio).detach()
    rejected_reward = (beta * rejected_logratio).detach()
    stats = {
        "chosen_reward": chosen_reward.mean(),
        "rejected_reward": rejected_reward.mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
    }
    return losses.mean(), stats
