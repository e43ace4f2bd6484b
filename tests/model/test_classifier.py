import pytest
import torch

from pipeline.model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from pipeline.model.classifier import GPTClassifier, collate_texts, pool_hidden_states


def tiny(**overrides) -> GPTConfig:
    fields = dict(vocab_size=97, context_length=16, n_layer=3, n_head=2, n_embd=16)
    return GPTConfig(**{**fields, **overrides})


@pytest.fixture
def classifier() -> GPTClassifier:
    torch.manual_seed(0)
    return GPTClassifier(tiny(), ["ham", "spam"]).eval()


def test_pooling_picks_the_right_positions_on_a_hand_built_batch():
    # Two sequences of widths 3 and 1 padded to 3; hidden value = 10*row + position.
    hidden = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]]).unsqueeze(-1)
    lengths = torch.tensor([3, 1])
    assert pool_hidden_states(hidden, lengths, "last").flatten().tolist() == [2.0, 10.0]
    assert pool_hidden_states(hidden, lengths, "mean").flatten().tolist() == [1.0, 10.0]
    assert pool_hidden_states(hidden, lengths, "first").flatten().tolist() == [0.0, 10.0]
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden_states(hidden, lengths, "max")


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
def test_padding_does_not_change_a_texts_logits(pooling):
    torch.manual_seed(1)
    model = GPTClassifier(tiny(), ["a", "b", "c"], pooling).eval()
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]
    tokens, lengths = collate_texts([short, long])
    assert tokens[0].tolist() == [5, 6, 7] + [0] * 6 and lengths.tolist() == [3, 9]
    tokens[0, 3:] = 11  # padding is within this toy vocabulary
    batched = model(tokens, lengths)
    alone = model(torch.tensor([short]), torch.tensor([3]))
    assert batched.shape == (2, 3)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-6, rtol=0)


def test_collate_rejects_empty_texts():
    with pytest.raises(ValueError, match="empty text"):
        collate_texts([[1, 2], []])


def test_from_language_model_copies_the_body_and_adds_a_fresh_head():
    torch.manual_seed(2)
    lm = GPT(tiny()).eval()
    clf = GPTClassifier.from_language_model(lm, ["ham", "spam"]).eval()
    idx = torch.randint(0, 97, (2, 5))
    torch.testing.assert_close(clf.hidden_states(idx), lm.hidden_states(idx), atol=0, rtol=0)
    assert clf.classifier.weight.shape == (2, 16) and not clf.classifier.bias.any()
    clf.tok_emb.weight.data.zero_()
    assert lm.tok_emb.weight.abs().sum() > 0  # a copy, not shared


def test_trainable_blocks_select_the_last_blocks_norm_and_head(classifier):
    def trainable() -> set[str]:
        return {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                for n, p in classifier.named_parameters() if p.requires_grad}  # fmt: skip

    classifier.set_trainable(1)
    assert trainable() == {"blocks.2", "ln_f", "classifier"}
    classifier.set_trainable(0)
    assert trainable() == {"ln_f", "classifier"}
    count = classifier.set_trainable("all")
    assert count == sum(p.numel() for p in classifier.parameters())
    for bad in (4, -1, "some"):
        with pytest.raises(ValueError, match="trainable blocks"):
            classifier.set_trainable(bad)


def test_checkpoint_round_trip_gives_a_classifier_with_its_labels(classifier, tmp_path):
    meta = {"classifier": {"labels": classifier.labels, "pooling": "last"}}
    save_checkpoint(classifier, tmp_path / "clf", metadata=meta)
    loaded = load_checkpoint(tmp_path / "clf").eval()
    assert isinstance(loaded, GPTClassifier) and loaded.labels == ["ham", "spam"]
    tokens, lengths = collate_texts([[1, 2, 3], [4]])
    torch.testing.assert_close(loaded(tokens % 97, lengths), classifier(tokens % 97, lengths))


def test_bad_classifier_section_is_named(classifier, tmp_path):
    save_checkpoint(classifier, tmp_path / "clf", metadata={"classifier": {"labels": ["one"]}})
    with pytest.raises(ValueError, match="bad 'classifier' section"):
        load_checkpoint(tmp_path / "clf")
