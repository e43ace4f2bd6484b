"""Low-rank adaptation (LoRA): train a small update B·A beside each frozen Linear of the GPT.

`apply_lora` swaps the targeted ``nn.Linear`` modules for `LoRALinear` in place and freezes
everything else; `merge_lora` folds each update into its Linear, giving back a plain GPT that
`save_checkpoint` and every other consumer of the model handle as usual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.errors import InputError

LORA_TARGETS = ("attn_qkv", "attn_proj", "mlp")
_TARGET_MODULES = {
    "attn_qkv": ("attn.qkv",),
    "attn_proj": ("attn.proj",),
    "mlp": ("mlp.fc", "mlp.proj"),
}


class LoRALinear(nn.Module):
    """``base(x) + dropout(x) @ A.T @ B.T * (alpha / rank)`` with the base Linear frozen.

    A (rank x in) starts like an nn.Linear weight (kaiming-uniform, a=sqrt(5)) and B (out x rank)
    at zero, so a fresh adapter leaves the output exactly unchanged while B still gets gradients.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        _check_hyperparameters(rank, alpha, dropout)
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The base weight with the update folded in: W + (alpha / rank) · B @ A."""
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


@dataclass(frozen=True)
class LoRAStats:
    """What `apply_lora` did: modules wrapped and parameters trainable (tied weights once)."""

    modules: int
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        """Trainable share of all parameters, the adapters included in the total."""
        return self.trainable / self.total if self.total else 0.0


def _check_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InputError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise InputError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: str | Sequence[str] = LORA_TARGETS,
) -> LoRAStats:
    """Freeze every parameter of `model` (embeddings, norms and head too) and wrap the targeted
    Linear modules of each block in a trainable `LoRALinear`, in place.

    `targets` names groups of LORA_TARGETS: ``attn_qkv`` (blocks[i].attn.qkv), ``attn_proj``
    (blocks[i].attn.proj), ``mlp`` (blocks[i].mlp.fc and blocks[i].mlp.proj).
    """
    _check_hyperparameters(rank, alpha, dropout)
    if isinstance(targets, str):
        targets = (targets,)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise InputError(f"unknown LoRA target {unknown[0]!r}; known: {', '.join(LORA_TARGETS)}")
    if not targets:
        raise InputError(f"LoRA targets are empty; choose from {', '.join(LORA_TARGETS)}")
    blocks = getattr(getattr(model, "_orig_mod", model), "blocks", None)
    if blocks is None:
        raise TypeError(f"expected a GPT (a model with .blocks), got {type(model).__name__}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise InputError("model already has LoRA adapters; merge_lora it first")
    model.requires_grad_(False)
    wrapped = 0
    for block in blocks:
        for target in dict.fromkeys(targets):
            for path in _TARGET_MODULES[target]:
                parent_name, name = path.split(".")
                parent = getattr(block, parent_name)
                base = getattr(parent, name)
                if not isinstance(base, nn.Linear):
                    raise TypeError(f"{path} is {type(base).__name__}, expected nn.Linear")
                setattr(parent, name, LoRALinear(base, rank, alpha, dropout).train(base.training))
                wrapped += 1
    params = list(model.parameters())
    return LoRAStats(
        modules=wrapped,
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base Linear and put that Linear back, in place.

    The result has exactly a plain GPT's modules and state_dict keys, and every parameter
    requires grad again, as in a freshly built model: it is an ordinary GPT to save, load,
    evaluate or fine-tune further (a fully frozen model would make the next optimizer fail).
    Returns `model`.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                base = child.base
                base.weight.copy_(child.merged_weight())
                setattr(parent, name, base)
    model.requires_grad_(True)
    return model
