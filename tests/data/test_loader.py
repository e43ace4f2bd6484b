import numpy as np
import pytest
import torch

from pipeline.data.loader import TokenWindows, evaluation_batches

TOKENS = np.arange(1000, dtype=np.uint16)


def test_targets_are_inputs_shifted_by_one():
    x, y = TokenWindows(TOKENS, 16, 4, seed=1).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive ids


@pytest.mark.parametrize("sampling", ["random", "sliding"])
def test_restored_state_continues_with_the_same_batches(sampling):
    first = TokenWindows(TOKENS, 16, 4, sampling=sampling, stride=8, seed=3)
    for _ in range(5):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(30)]
    second = TokenWindows(TOKENS, 16, 4, sampling=sampling, stride=8, seed=3)
    second.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (second.next_batch() for _ in range(30)), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="does not belong"):
        TokenWindows(TOKENS, 16, 4, sampling=sampling, seed=4).load_state_dict(state)


def test_sliding_epoch_visits_every_window_once():
    tokens = np.arange(101, dtype=np.uint16)
    windows = TokenWindows(tokens, 10, 5, sampling="sliding", stride=10, seed=0)
    assert windows.num_windows == 10
    batches = [windows.next_batch()[0] for _ in range(2)]
    starts = sorted(int(x[i, 0]) for x in batches for i in range(5))
    assert starts == list(range(0, 100, 10))
    assert windows.epoch == 1.0


def test_random_windows_stay_in_bounds_and_depend_on_seed():
    a = TokenWindows(TOKENS, 100, 64, seed=0)
    batches = [a.next_batch()[1] for _ in range(20)]
    assert max(int(b.max()) for b in batches) <= 999
    b = TokenWindows(TOKENS, 100, 64, seed=1)
    assert not torch.equal(TokenWindows(TOKENS, 100, 64, seed=0).next_batch()[0], b.next_batch()[0])


def test_evaluation_batches_are_fixed_and_cover_the_split():
    batches = evaluation_batches(TOKENS, 16, 4, 3)
    assert batches[0][0][0, 0] == 0
    assert batches[-1][1][-1, -1] == 999
    again = evaluation_batches(TOKENS, 16, 4, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_too_short_split_is_named():
    with pytest.raises(ValueError, match="val: 10 tokens, fewer than context_length"):
        evaluation_batches(np.arange(10, dtype=np.uint16), 16, 1, 1, name="val")


def test_example_batches_visit_every_example_once_per_epoch_and_resume():
    from pipeline.data.loader import ExampleBatches

    def collate(indices):
        return (torch.tensor(indices),)

    batches = ExampleBatches(10, 4, collate, seed=3)
    assert batches.steps_per_epoch == 3
    epoch = [batches.next_batch()[0].tolist() for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2]
    assert sorted(sum(epoch, [])) == list(range(10))
    second = [batches.next_batch()[0].tolist() for _ in range(3)]
    assert sorted(sum(second, [])) == list(range(10)) and second != epoch
    assert batches.epoch == 2.0

    resumed = ExampleBatches(10, 4, collate, seed=3)
    resumed.load_state_dict({"batches_drawn": 3, "seed": 3})
    assert [resumed.next_batch()[0].tolist() for _ in range(3)] == second
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({"batches_drawn": 3, "seed": 4})


def test_example_batches_custom_order_must_be_a_permutation():
    from pipeline.data.loader import ExampleBatches

    sorted_order = ExampleBatches(
        5, 2, lambda ix: (torch.tensor(ix),), order=lambda g: [4, 3, 2, 1, 0]
    )
    assert sorted_order.next_batch()[0].tolist() == [4, 3]
    broken = ExampleBatches(5, 2, lambda ix: (torch.tensor(ix),), order=lambda g: [0, 0, 1, 2, 3])
    with pytest.raises(ValueError, match="permutation"):
        broken.next_batch()


@pytest.mark.parametrize("sampling", ["random", "sliding"])
def test_token_window_shards_split_each_global_batch(sampling):
    tokens = np.arange(500, dtype=np.uint16)
    whole = TokenWindows(tokens, 8, 6, sampling=sampling, seed=1)
    shards = [TokenWindows(tokens, 8, 6, sampling=sampling, seed=1) for _ in range(3)]
    for rank, shard in enumerate(shards):
        shard.shard(rank, 3)
    for _ in range(4):
        x, y = whole.next_batch()
        parts = [shard.next_batch() for shard in shards]
        assert all(p[0].shape == (2, 8) for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert shards[2].state_dict() == whole.state_dict()
    with pytest.raises(ValueError, match="batch_size 6 is the global batch.*4"):
        TokenWindows(tokens, 8, 6).shard(0, 4)


def test_example_batch_shards_partition_each_batch_uneven_last_included():
    from pipeline.data.loader import ExampleBatches

    def collate(indices):
        return (torch.tensor(indices),)

    whole = ExampleBatches(11, 4, collate, seed=2)
    shards = [ExampleBatches(11, 4, collate, seed=2) for _ in range(2)]
    for rank, shard in enumerate(shards):
        shard.shard(rank, 2)
    sizes = []
    for _ in range(6):  # two epochs; each ends with a batch of 3 split 2 + 1
        parts = [shard.next_batch()[0].tolist() for shard in shards]
        assert parts[0] + parts[1] == whole.next_batch()[0].tolist()
        sizes.append([len(p) for p in parts])
    assert sizes == [[2, 2], [2, 2], [2, 1]] * 2

    with pytest.raises(ValueError, match="last batch holds 1 of 9 examples, fewer than the 2"):
        ExampleBatches(9, 4, collate).shard(1, 2)
    with pytest.raises(ValueError, match="must be divisible by the number of processes"):
        ExampleBatches(12, 4, collate).shard(0, 3)


def test_windows_over_shards_are_the_windows_over_the_whole_array():
    from pipeline.data.tokens import TokenShards

    whole = np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16)
    shards = TokenShards(np.split(whole, [1200, 1201, 3000]))
    for sampling in ("random", "sliding"):
        flat = TokenWindows(whole, 32, 8, sampling=sampling, stride=20, seed=5)
        sharded = TokenWindows(shards, 32, 8, sampling=sampling, stride=20, seed=5)
        for _ in range(20):
            for a, b in zip(flat.next_batch(), sharded.next_batch(), strict=True):
                assert torch.equal(a, b)
    for a, b in zip(evaluation_batches(whole, 32, 4, 3), evaluation_batches(shards, 32, 4, 3),
                    strict=True):  # fmt: skip
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
