import pytest
import torch

from pipeline.model import GPT, PRESETS, GPTConfig

# Hugging Face's GPT2LMHeadModel.num_parameters() for gpt2, gpt2-medium, -large, -xl.
REFERENCE_COUNTS = {
    "gpt2-124m": 124_439_808,
    "gpt2-355m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1558m": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_preset_parameter_counts_match_openai(name):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(name))
    assert model.num_parameters() == REFERENCE_COUNTS[name]
    config = model.config
    assert config.qkv_bias
    assert model.num_parameters(exclude_position_embeddings=True) == (
        REFERENCE_COUNTS[name] - config.context_length * config.n_embd
    )


def test_tiny_preset_is_cpu_sized_with_gpt2_vocab():
    config = GPTConfig.from_preset("tiny")
    assert (config.context_length, config.n_layer, config.n_head, config.n_embd) == (
        128,
        4,
        4,
        128,
    )
    assert config.vocab_size == 50257
    assert set(PRESETS) == {"tiny", *REFERENCE_COUNTS}


def test_defaults_are_gpt2_small_and_hold_no_attention_backend():
    config = GPTConfig()
    assert config == GPTConfig.from_preset("gpt2-124m")
    assert "attention" not in config.to_dict()  # a run-time choice, not the architecture


def test_round_trip_and_overrides():
    config = GPTConfig.from_preset("tiny", dropout=0.1)
    assert config.dropout == 0.1
    assert GPTConfig.from_dict(config.to_dict()) == config


def test_configs_saved_with_an_attention_backend_still_load():
    old = {**GPTConfig.from_preset("tiny").to_dict(), "attention": "fused"}
    assert GPTConfig.from_dict(old) == GPTConfig.from_preset("tiny")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_embd": 100, "n_head": 3}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"context_length": 1.5}, "context_length"),
        ({"dropout": 1.0}, "dropout"),
        ({"attn_dropout": -0.1}, "attn_dropout"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
    ],
)
def test_invalid_fields_are_named(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**overrides)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="n_layers.*num_heads|num_heads.*n_layers"):
        GPTConfig.from_dict({"n_layers": 2, "num_heads": 4})


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt2-124m") as info:
        GPTConfig.from_preset("gpt3")
    assert "tiny" in str(info.value)
