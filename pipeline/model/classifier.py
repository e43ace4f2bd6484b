"""GPT-2 with a classification head: the book's spam classifier, generalised.

The body is the language model unchanged (its tied LM head stays, unused), so a classifier
checkpoint holds every tensor of the model it started from plus `classifier.weight/bias`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pipeline.errors import InputError
from pipeline.model.architecture import GPTConfig
from pipeline.model.gpt import GPT

if TYPE_CHECKING:
    import tiktoken

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
    raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


class GPTClassifier(GPT):
    """A GPT whose output is one logit per label, read from the pooled final hidden states."""

    def __init__(
        self,
        config: GPTConfig,
        labels: Sequence[str],
        pooling: str = "last",
        attention: str = "sdpa",
    ) -> None:
        super().__init__(config, attention)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise InputError(f"a classifier needs at least two distinct labels, got {list(labels)}")
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.labels = list(labels)
        self.pooling = pooling
        self.classifier = nn.Linear(config.n_embd, len(labels))
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    # Deliberately not GPT's signature: the sequence lengths for pooling take the place of the
    # KV cache and the LM targets, which a classifier has no use for.
    def forward(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, idx: Tensor, lengths: Tensor | None = None
    ) -> Tensor:
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
            classifier = cls(model.config, labels, pooling, attention=model.attention)
        result = classifier.load_state_dict(model.state_dict(), strict=False)
        missing = sorted(set(result.missing_keys) - {"classifier.weight", "classifier.bias"})
        if missing or result.unexpected_keys:
            raise InputError(
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
                raise InputError(
                    f"trainable blocks must be 'all' or 0..{self.config.n_layer}, got {blocks!r}"
                )
            for p in self.parameters():
                p.requires_grad_(False)
            trained = [*self.blocks[len(self.blocks) - blocks :], self.ln_f, self.classifier]
            for module in trained:
                for p in module.parameters():
                    p.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def encode_texts(
    texts: Sequence[str], tokenizer: tiktoken.Encoding, max_length: int
) -> tuple[list[list[int]], int]:
    """Token ids per text, cut to `max_length`; also how many texts were cut."""
    ids = [tokenizer.encode_ordinary(t) for t in texts]
    truncated = sum(len(x) > max_length for x in ids)
    return [x[:max_length] for x in ids], truncated


def collate_texts(
    ids: Sequence[Sequence[int]], labels: Sequence[int] | None = None, pad_id: int = 0
) -> tuple[torch.Tensor, ...]:
    """(tokens right-padded to the longest, lengths[, labels]); pooling reads `lengths`. The
    padding is id 0 (in every vocabulary): causal attention keeps it out of every real position
    and pooling reads only those, so its value changes no result."""
    if any(len(x) == 0 for x in ids):
        raise InputError("cannot classify an empty text (it has no tokens)")
    longest = max(len(x) for x in ids)
    tokens = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    for row, x in enumerate(ids):
        tokens[row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    if labels is None:
        return tokens, lengths
    return tokens, lengths, torch.as_tensor(labels, dtype=torch.long)


@torch.no_grad()
def predict_logits(model: nn.Module, ids: Sequence[Sequence[int]], batch_size: int) -> torch.Tensor:
    """Class logits (N, num_labels) in float32 on the CPU, in input order, of a `GPTClassifier`
    or a wrapper that forwards its attributes (the training loop's compiled module)."""
    tok_emb = model.tok_emb
    assert isinstance(tok_emb, nn.Embedding)
    device = tok_emb.weight.device
    out = []
    for start in range(0, len(ids), batch_size):
        tokens, lengths = collate_texts(ids[start : start + batch_size])
        out.append(model(tokens.to(device), lengths.to(device)).float().cpu())
    return torch.cat(out)


def predict_probabilities(
    model: GPTClassifier, ids: Sequence[Sequence[int]], batch_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """Softmax class probabilities (N, num_labels) of the logits divided by `temperature` (the
    calibration the classifier stage fits; 1: the raw softmax), on the CPU, in input order."""
    return torch.softmax(predict_logits(model, ids, batch_size) / temperature, dim=-1)
