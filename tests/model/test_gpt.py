import math

import pytest
import torch

from pipeline.model import GPT, GPTConfig


def tiny(**overrides):
    fields = dict(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


def test_forward_shape():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 97, (3, 16))
    assert model(idx).shape == (3, 16, 97)
    assert model(idx[:, :5]).shape == (3, 5, 97)


def test_too_long_input_is_a_clear_error():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="exceeds context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="batch, time"):
        model(torch.zeros(17, dtype=torch.long))


def test_readable_module_names_and_tied_head():
    model = GPT(tiny())
    names = set(dict(model.named_parameters(remove_duplicate=False)))
    for name in [
        "tok_emb.weight",
        "pos_emb.weight",
        "blocks.1.ln_1.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.qkv.bias",
        "blocks.1.attn.proj.weight",
        "blocks.1.ln_2.bias",
        "blocks.1.mlp.fc.weight",
        "blocks.1.mlp.proj.weight",
        "ln_f.weight",
        "lm_head.weight",
    ]:
        assert name in names
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.bias is None
    assert model.ln_f.eps == 1e-5
    assert GPT(tiny(qkv_bias=False)).blocks[0].attn.qkv.bias is None


def test_gpt2_initialisation():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, n_embd=64))
    assert math.isclose(model.tok_emb.weight.std().item(), 0.02, rel_tol=0.05)
    assert math.isclose(model.blocks[0].attn.qkv.weight.std().item(), 0.02, rel_tol=0.05)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        assert math.isclose(block.mlp.proj.weight.std().item(), residual_std, rel_tol=0.1)
        assert math.isclose(block.attn.proj.weight.std().item(), residual_std, rel_tol=0.1)
    for name, p in model.named_parameters():
        if name.endswith("bias") and ".ln_" not in name and "ln_f" not in name:
            assert torch.all(p == 0), name


def test_flops_per_token():
    model = GPT(tiny())
    n = model.num_parameters() - 16 * 32
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 16
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * 2 * 32 * 8


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 97, (2, 16))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_set_attention_keeps_weights_and_mode():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 97, (2, 16))
    before = model(idx)
    keys = list(model.state_dict())
    model.eval()
    model.set_attention("multihead")
    assert model.attention == "multihead"
    assert not model.blocks[0].attn.backend.training
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention"):
        model.set_attention("nope")
