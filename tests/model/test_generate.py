import logging
import math

import pytest
import torch

from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.model import ATTENTION_BACKENDS, GPT, GPTConfig, generate_tokens
from pipeline.model.generate import (
    generate,
    sample_next,
    stream_text,
    stream_until,
    top_k_filter,
    top_p_filter,
)

NEG_INF = float("-inf")


def tiny(**overrides):
    fields = dict(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def sharpen(model):
    """Scale the weights up so greedy decoding of a random model does not settle on one token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10)
    return model


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny())


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_greedy_cache_matches_no_cache_beyond_context(backend):
    torch.manual_seed(0)
    model = sharpen(GPT(tiny(), attention=backend))
    prompt = [5, 17, 3, 42, 8]
    cached = generate(model, prompt, 30, use_cache=True)
    uncached = generate(model, prompt, 30, use_cache=False)
    assert len(cached) == 30
    assert len(set(cached[12:])) > 1
    assert cached == uncached


def test_seeded_sampling_cache_matches_no_cache(model):
    prompt = list(range(10, 22))
    kw = dict(temperature=1.3, top_k=40, top_p=0.95)
    runs = [
        generate(model, prompt, 25, use_cache=use_cache, generator=seeded(7), **kw)
        for use_cache in (True, False)
    ]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 5
    assert generate(model, prompt, 25, generator=seeded(7), **kw) == runs[0]
    other_seed = generate(model, prompt, 25, generator=seeded(8), **kw)
    assert other_seed != runs[0]


def test_prompt_longer_than_context_is_cropped_with_a_warning(model, caplog):
    prompt = list(range(40))
    with caplog.at_level(logging.WARNING, logger="pipeline.model.generate"):
        cropped = generate(model, prompt, 3)
    assert [r.getMessage() for r in caplog.records] == [
        "the prompt has 40 tokens, more than the model's context of 16: generating from its "
        "last 16 tokens only (the first 24 are dropped)"
    ]
    caplog.clear()
    assert cropped == generate(model, prompt[-16:], 3)
    assert not caplog.records  # a prompt that fits is not warned about


def test_streams_one_token_at_a_time(model):
    stream = generate_tokens(model, [1, 2, 3], 4)
    first = next(stream)
    assert isinstance(first, int)
    assert torch.is_grad_enabled()
    assert [first, *stream] == generate(model, [1, 2, 3], 4)


def test_eos_stops_without_being_yielded(model):
    def run(**kw):
        return generate(model, [4, 9, 16], 12, temperature=1.0, generator=seeded(3), **kw)

    out = run()
    cut = next(i for i, t in enumerate(out) if i > 0 and t not in out[:i])
    assert run(eos_id=out[cut]) == out[:cut]
    assert run(eos_id=out[0]) == []
    assert generate(model, [4, 9, 16], 0) == []


def test_restores_training_mode_and_grad_mode(model):
    model.train()
    model.blocks[0].eval()
    generate(model, [1, 2], 3)
    assert model.training and model.lm_head.training
    assert not model.blocks[0].training
    assert torch.is_grad_enabled()
    model.eval()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt_ids=[]), "empty"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ],
)
def test_invalid_arguments_fail_before_generating(model, kwargs, match):
    args = dict(prompt_ids=[1, 2], max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=match):
        generate_tokens(model, **args)


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0], [0.0, -1.0, 4.0, 4.0]])
    expected = torch.tensor([[NEG_INF, 5.0, 3.0, NEG_INF], [NEG_INF, NEG_INF, 4.0, 4.0]])
    assert torch.equal(top_k_filter(logits, 2), expected)
    assert torch.equal(top_k_filter(logits, 10), logits)
    assert torch.equal(top_k_filter(logits[0], 1), torch.tensor([NEG_INF, 5.0, NEG_INF, NEG_INF]))


def test_top_p_filter_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()
    kept = {
        0.3: [1],
        0.5: [1],
        0.6: [1, 3],
        0.8: [1, 3],
        0.9: [0, 1, 3],
        0.99: [0, 1, 2, 3],
        1.0: [0, 1, 2, 3],
    }
    for p, indices in kept.items():
        filtered = top_p_filter(logits, p)
        assert torch.isfinite(filtered).nonzero().flatten().tolist() == indices, p
        assert torch.equal(filtered[indices], logits[indices])
    batch = torch.stack([logits, logits.flip(0)])
    out = top_p_filter(batch, 0.6)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, True, False]]


def test_sampling_respects_filters():
    logits = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    generator = seeded(0)
    seen = {sample_next(logits, temperature=1.0, top_p=0.6, generator=generator) for _ in range(99)}
    assert seen == {1, 3}
    seen = {sample_next(logits, temperature=5.0, top_k=3, generator=generator) for _ in range(99)}
    assert seen == {0, 1, 3}
    assert sample_next(logits, temperature=0.0) == 1
    assert sample_next(logits, temperature=2.0, top_k=1, generator=generator) == 1


def test_low_temperature_approaches_greedy():
    logits = torch.tensor([1.0, 1.2, 0.9])
    generator = seeded(0)
    draws = [sample_next(logits, temperature=0.01, generator=generator) for _ in range(50)]
    assert draws == [1] * 50
    assert math.isclose(torch.softmax(logits / 0.01, -1)[1].item(), 1.0, rel_tol=1e-6)


def test_streamed_text_never_splits_a_character(mirror):
    tokenizer = gpt2_tokenizer(mirror / "gpt2-bpe")
    text = "naïve 日本語 🚀 done"
    ids = tokenizer.encode_ordinary(text)
    assert any(
        len(tokenizer.decode_single_token_bytes(t).decode("utf-8", "replace")) == 1
        and "\ufffd" in tokenizer.decode_single_token_bytes(t).decode("utf-8", "replace")
        for t in ids
    )  # some token holds only part of a character
    pieces = list(stream_text(iter(ids), tokenizer))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_until_stops_at_a_marker_split_across_pieces():
    pieces = ["The answer", " is 4.\n\n#", "## Instr", "uction: more"]
    assert "".join(stream_until(iter(pieces), ["\n\n### "])) == "The answer is 4."
    # text that only looks like the start of a marker is released once it cannot be one
    out = list(stream_until(iter(["a\n", "\nb", "c"]), ["\n\n### "]))
    assert "".join(out) == "a\n\nbc" and out[0] == "a"
    assert "".join(stream_until(iter(["ab", "c"]), ["<|user|>"])) == "abc"
