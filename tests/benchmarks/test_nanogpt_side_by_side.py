"""The nanoGPT benchmark's state-dict mapping: karpathy/nanoGPT's layout gives transformers'
logits in our GPT."""

import runpy
from pathlib import Path

import pytest
import torch
from gpt2_reference import SHAPES, GPT2LMHeadModel, hf_model, logits_of

from pipeline.model import GPT, GPTConfig

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "nanogpt_side_by_side.py"
state_dict_from_nanogpt = runpy.run_path(str(BENCHMARK))["state_dict_from_nanogpt"]

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def nanogpt_state(reference: GPT2LMHeadModel, compiled: bool) -> dict[str, torch.Tensor]:
    """`reference` in karpathy/nanoGPT's layout, written here without its code: Hugging Face's
    names, nn.Linear (out, in) weights (nanoGPT's `from_pretrained` transposes the Conv1D ones),
    the tied lm_head.weight, and "_orig_mod." before every name when saved from a compiled
    model."""
    prefix = "_orig_mod." if compiled else ""
    return {
        prefix + name: t.t().contiguous() if name.endswith(_CONV1D) else t.clone()
        for name, t in reference.state_dict().items()
    }


def _nanogpt_config(shape) -> GPTConfig:
    n_layer, n_head, n_embd, n_positions, vocab_size = shape
    return GPTConfig(vocab_size=vocab_size, context_length=n_positions, n_layer=n_layer,
                     n_head=n_head, n_embd=n_embd)  # fmt: skip


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_nanogpt_state_dict_gives_the_same_logits(shape, compiled):
    reference = hf_model(shape, seed=sum(shape))
    config = _nanogpt_config(shape)
    state = state_dict_from_nanogpt(nanogpt_state(reference, compiled), config)
    model = GPT(config).eval()
    result = model.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == ["lm_head.weight"] and not result.unexpected_keys
    idx = torch.randint(0, config.vocab_size, (2, config.context_length),
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(logits_of(model, idx), logits_of(reference, idx), atol=1e-5, rtol=0)


def test_nanogpt_state_dict_in_conv1d_layout_is_named_as_misshaped():
    reference = hf_model(SHAPES[1])
    with pytest.raises(ValueError, match=r"wrong shape: transformer\.h\.0\.attn\.c_attn\.weight"):
        state_dict_from_nanogpt(reference.state_dict(), _nanogpt_config(SHAPES[1]))
