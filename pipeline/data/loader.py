"""Batches of (input, target) token windows of `context_length + 1` tokens from a token file.

`TokenWindows` is resumable: its whole position is a couple of integers, so a restarted run
draws exactly the batches the interrupted one would have.

Under multi-process training every process draws the same global batch positions and reads only
its own rows (`shard`), so the position stays a property of the run, not of the world size: a
run can resume under any number of processes that divides the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.errors import InputError

_SEED_STRIDE = 1_000_003


class TokenArray(Protocol):
    """An array of token ids, or a split's shards read as one (`pipeline.data.tokens.TokenShards`):
    its length, and the ids at an integer array of positions, in that array's shape."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: np.ndarray, /) -> np.ndarray: ...


def _check_length(tokens: TokenArray, context_length: int, what: str) -> None:
    if len(tokens) < context_length + 1:
        raise InputError(
            f"{what}: {len(tokens)} tokens, fewer than context_length + 1 = {context_length + 1} "
            "(use a larger corpus, a larger prepare.val_fraction or a smaller model.context_length)"
        )


def windows_to_batch(
    tokens: TokenArray, starts: np.ndarray, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = np.arange(context_length + 1)
    block = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


class TokenWindows:
    """Training batches: random windows, or sliding windows (every `stride` tokens) in
    shuffled epochs. Implements the training loop's `Batches` protocol."""

    def __init__(
        self,
        tokens: TokenArray,
        context_length: int,
        batch_size: int,
        *,
        sampling: str = "random",
        stride: int | None = None,
        seed: int = 0,
        name: str = "train",
    ) -> None:
        _check_length(tokens, context_length, name)
        if sampling not in ("random", "sliding"):
            raise InputError(f"sampling must be 'random' or 'sliding', got {sampling!r}")
        self.tokens = tokens
        self.context_length = context_length
        self.batch_size = batch_size
        self.sampling = sampling
        self.stride = stride or context_length
        self.seed = seed
        self.name = name
        self.last_start = len(tokens) - context_length - 1
        self.num_windows = self.last_start // self.stride + 1
        self.batches_drawn = 0
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        """Make `next_batch` return this process's `batch_size / world_size` rows of each batch."""
        if self.batch_size % world_size:
            raise InputError(
                f"{self.name}: batch_size {self.batch_size} is the global batch and must be "
                f"divisible by the number of processes ({world_size})"
            )
        self.rank, self.world_size = rank, world_size

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * _SEED_STRIDE + index)

    def _sliding_starts(self) -> np.ndarray:
        first = self.batches_drawn * self.batch_size
        epochs: dict[int, np.ndarray] = {}
        starts = []
        for n in range(first, first + self.batch_size):
            epoch, offset = divmod(n, self.num_windows)
            if epoch not in epochs:
                epochs[epoch] = torch.randperm(
                    self.num_windows, generator=self._generator(epoch)
                ).numpy()
            starts.append(epochs[epoch][offset] * self.stride)
        return np.asarray(starts, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sampling == "random":
            generator = self._generator(self.batches_drawn)
            starts = torch.randint(
                0, self.last_start + 1, (self.batch_size,), generator=generator
            ).numpy()
        else:
            starts = self._sliding_starts()
        self.batches_drawn += 1
        rows = self.batch_size // self.world_size
        starts = starts[self.rank * rows : (self.rank + 1) * rows]
        return windows_to_batch(self.tokens, starts, self.context_length)

    @property
    def epoch(self) -> float:
        return self.batches_drawn * self.batch_size / self.num_windows

    def state_dict(self) -> dict[str, Any]:
        return {"batches_drawn": self.batches_drawn, "sampling": self.sampling, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sampling") != self.sampling or state.get("seed") != self.seed:
            raise InputError(f"data state {state} does not belong to this {self.sampling} sampler")
        self.batches_drawn = int(state["batches_drawn"])


def evaluation_batches(
    tokens: TokenArray, context_length: int, batch_size: int, num_batches: int, name: str = "val"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same windows every time, spread evenly over the whole split."""
    _check_length(tokens, context_length, name)
    last_start = len(tokens) - context_length - 1
    count = batch_size * num_batches
    starts = np.linspace(0, last_start, num=count).round().astype(np.int64)
    return [
        windows_to_batch(tokens, starts[i : i + batch_size], context_length)
        for i in range(0, count, batch_size)
    ]


class ExampleBatches:
    """Batches of whole examples (fine-tuning): each epoch visits every example once, in an
    order drawn from `seed` and the epoch number, so the position is one integer.

    `collate` turns a list of example indices into the batch tensors; `order` (optional)
    replaces the plain shuffle, e.g. with length-bucketed batches. The last batch of an epoch
    may be smaller. Implements the training loop's `Batches` protocol.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        collate: Callable[[list[int]], tuple[torch.Tensor, ...]],
        *,
        seed: int = 0,
        order: Callable[[torch.Generator], list[int]] | None = None,
        name: str = "train",
    ) -> None:
        if num_examples < 1:
            raise InputError(f"{name}: no examples to train on")
        if batch_size < 1:
            raise InputError(f"{name}: batch_size must be >= 1, got {batch_size}")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.order = order
        self.name = name
        self.batches_drawn = 0
        self.rank, self.world_size = 0, 1
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def shard(self, rank: int, world_size: int) -> None:
        """Make `next_batch` collate only this process's share of each batch's examples.

        Shares differ by at most one example (an epoch's last batch may not split evenly); the
        training loop weights each process's loss by its share, so the gradient is the global
        batch's. Every process must get at least one example of every batch.
        """
        if self.batch_size % world_size:
            raise InputError(
                f"{self.name}: batch_size {self.batch_size} is the global batch and must be "
                f"divisible by the number of processes ({world_size})"
            )
        last = self.num_examples % self.batch_size
        if 0 < last < world_size:
            raise InputError(
                f"{self.name}: an epoch's last batch holds {last} of {self.num_examples} "
                f"examples, fewer than the {world_size} processes; choose a batch_size that "
                "leaves no such remainder, or fewer processes"
            )
        self.rank, self.world_size = rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
            if self.order is None:
                indices = torch.randperm(self.num_examples, generator=generator).tolist()
            else:
                indices = list(self.order(generator))
                if sorted(indices) != list(range(self.num_examples)):
                    raise InputError("order() must return a permutation of the example indices")
            size = self.batch_size
            batches = [indices[i : i + size] for i in range(0, len(indices), size)]
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        epoch, index = divmod(self.batches_drawn, self.steps_per_epoch)
        batch = self._epoch_batches(epoch)[index]
        self.batches_drawn += 1
        share, extra = divmod(len(batch), self.world_size)
        first = self.rank * share + min(self.rank, extra)
        return self.collate(batch[first : first + share + (self.rank < extra)])

    @property
    def epoch(self) -> float:
        return self.batches_drawn / self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_drawn": self.batches_drawn, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise InputError(
                f"data state {state} does not belong to this sampler (seed {self.seed})"
            )
        self.batches_drawn = int(state["batches_drawn"])
