"""A tiny language model and data source so the loop is tested without ``pipeline.model``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 16
SEQ = 8


class TinyLM(nn.Module):
    """Embedding -> dropout -> LayerNorm -> linear head; optionally tied like GPT-2, and with
    `blocks` (one hidden Linear after the norm, where GPT keeps the matrices Muon trains)."""

    def __init__(self, seed: int = 0, dropout: float = 0.0, tied: bool = False, dim: int = 16,
                 blocks: bool = False):  # fmt: skip
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, dim)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.Sequential(nn.Linear(dim, dim)) if blocks else nn.Identity()
        self.head = nn.Linear(dim, VOCAB, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.norm(self.drop(self.emb(x)))))


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def successor_batch(seed: int, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens whose target is the next vocabulary id: learnable by TinyLM."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    x = torch.randint(0, VOCAB, (batch_size, SEQ), generator=g)
    return x, (x + 1) % VOCAB


class SuccessorBatches:
    """Resumable source: batch i is a pure function of (seed, i), so its state is just i."""

    def __init__(self, batch_size: int = 4, seed: int = 0):
        self.batch_size = batch_size
        self.seed = seed
        self.index = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = successor_batch(self.seed, self.index, self.batch_size)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]


def eval_set(seed: int, n: int = 4, batch_size: int = 4):
    """A deterministic eval set: a fresh iterator of the same batches on each call."""
    return lambda: (successor_batch(seed, i, batch_size) for i in range(n))


class SimulatedKill(RuntimeError):
    pass


class RecordingLogger:
    """Collects everything fit logs; raises SimulatedKill when asked to log ``kill_at``."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.texts: list[tuple[str, str]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step == self.kill_at:
            raise SimulatedKill(f"killed at step {step}")
        self.metrics.append((step, dict(metrics)))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.texts.append((artifact_file, text))


@pytest.fixture
def toy() -> SimpleNamespace:
    return SimpleNamespace(
        VOCAB=VOCAB,
        SEQ=SEQ,
        TinyLM=TinyLM,
        lm_loss=lm_loss,
        SuccessorBatches=SuccessorBatches,
        successor_batch=successor_batch,
        eval_set=eval_set,
        RecordingLogger=RecordingLogger,
        SimulatedKill=SimulatedKill,
    )
