"""GPT-2 with a classification head: the book's spam classifier, generalised.

The body is the language model unchanged (its tied LM head stays, unused), so a classifier
checkpoint holds every tensor of the model it started from plus `classifier.weight/bias`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.model.config import GPTConfig
from pipeline.model.gpt import GPT

POOLINGS = ("last", "mean", "first")


def pool_hidden_states(hidden: Tensor, lengths: Tensor, pooling: str) -> Tensor:
    """One vector per sequence from right-padded (B, T, C) states: the last real token (it has
    attended to the whole text), the mean over real tokens, or the first token."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    if pooling == "mean":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        mask = (positions[None, :] < lengths[:, None]).to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / lengths.to(hidden.dtype).unsqueeze(-1)
    if pooling == "first":
        return hidden[:, 0]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


class GPTClassifier(GPT):
    """A GPT whose output is one logit per label, read from the pooled final hidden states."""

    def __init__(self, config: GPTConfig, labels: Sequence[str], pooling: str = "last") -> None:
        super().__init__(config)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"a classifier needs at least two distinct labels, got {list(labels)}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.labels = list(labels)
        self.pooling = pooling
        self.classifier = nn.Linear(config.n_embd, len(labels))
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, idx: Tensor, lengths: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Class logits (B, num_labels); `lengths` (B,) counts the real tokens before padding."""
        if lengths is None:
            lengths = torch.full((idx.shape[0],), idx.shape[1], device=idx.device)
        pooled = pool_hidden_states(self.hidden_states(idx), lengths, self.pooling)
        return self.classifier(pooled)

    @classmethod
    def from_language_model(
        cls, model: GPT, labels: Sequence[str], pooling: str = "last"
    ) -> GPTClassifier:
        """A classifier sharing nothing with `model` but a copy of its weights; a new head."""
        device = model.tok_emb.weight.device
        with torch.device(device):
            classifier = cls(model.config, labels, pooling)
        result = classifier.load_state_dict(model.state_dict(), strict=False)
        missing = sorted(set(result.missing_keys) - {"classifier.weight", "classifier.bias"})
        if missing or result.unexpected_keys:
            raise ValueError(
                f"language model does not fit the classifier: missing {missing}, "
                f"unexpected {result.unexpected_keys}"
            )
        return classifier

    def set_trainable(self, blocks: int | str) -> int:
        """Train `"all"` parameters, or only the last `blocks` transformer blocks plus the final
        LayerNorm and the head (the book trains the last block); returns the trainable count."""
        if blocks == "all":
            for p in self.parameters():
                p.requires_grad_(True)
        else:
            if not isinstance(blocks, int) or not 0 <= blocks <= self.config.n_layer:
                raise ValueError(
                    f"trainable blocks must be 'all' or 0..{self.config.n_layer}, got {blocks!r}"
                )
            for p in self.parameters():
                p.requires_grad_(False)
            trained = [*self.blocks[len(self.blocks) - blocks :], self.ln_f, self.classifier]
            for module in trained:
                for p in module.parameters():
                    p.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
