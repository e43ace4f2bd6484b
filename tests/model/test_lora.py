import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from pipeline.model.generate import generate
from pipeline.model.lora import LORA_TARGETS, LoRALinear, apply_lora, merge_lora
from pipeline.settings import TrainSettings
from pipeline.train.loop import configure_optimizer

CONFIG = GPTConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, n_embd=32)


def lora_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    kwargs = {"rank": 4, "alpha": 8.0, **kwargs}
    return model, apply_lora(model, **kwargs)


def randomize_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)


def test_lora_linear_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=3.0)
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x))
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (5, 2)
    assert torch.equal(layer.lora_B, torch.zeros(5, 2))
    # kaiming-uniform with a=sqrt(5): bound = 1 / sqrt(in_features)
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(6)
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * 1.5
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(
        layer.merged_weight(), base.weight + 1.5 * layer.lora_B @ layer.lora_A
    )


def test_fresh_adapters_change_nothing():
    torch.manual_seed(0)
    plain = GPT(CONFIG).eval()
    model, stats = lora_model(dropout=0.1)
    model.eval()
    idx = torch.randint(0, 97, (2, 16))
    assert torch.equal(model(idx), plain(idx))
    model.train()
    assert model(idx).shape == (2, 16, 97)


def test_apply_lora_freezes_everything_but_the_adapters():
    model, stats = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"blocks.{i}.{m}.lora_{ab}"
        for i in range(2)
        for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
        for ab in "AB"
    }
    # rank 4, per block: qkv 4*(32+96), proj 4*(32+32), fc 4*(32+128), mlp.proj 4*(128+32)
    assert stats.modules == 8
    assert stats.trainable == 2 * 4 * (128 + 64 + 160 + 160) == 4096
    assert stats.total == GPT(CONFIG).num_parameters() + 4096
    assert stats.fraction == pytest.approx(4096 / stats.total)
    assert stats.total == model.num_parameters()


def test_targets_select_modules():
    model, stats = lora_model(targets=("attn_qkv",))
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert isinstance(model.blocks[0].attn.proj, nn.Linear)
    assert isinstance(model.blocks[1].mlp.fc, nn.Linear)
    assert stats.modules == 2 and stats.trainable == 2 * 4 * 128
    model, stats = lora_model(targets="mlp")
    assert isinstance(model.blocks[1].mlp.fc, LoRALinear)
    assert isinstance(model.blocks[1].mlp.proj, LoRALinear)
    assert stats.modules == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be an integer >= 1"),
        ({"rank": 2.0}, "rank must be an integer >= 1"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"targets": ("attn_qkv", "attn_q")}, "unknown LoRA target 'attn_q'; known: attn_qkv"),
        ({"targets": ()}, "targets are empty"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora_model(**kwargs)


def test_applying_twice_is_an_error():
    model, _ = lora_model()
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=2, alpha=2.0)


def test_muon_trains_the_adapters_and_nothing_else():
    """With LoRA only the adapters train: all 2-D matrices inside the blocks, so all Muon's."""
    model, _ = lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainSettings(max_steps=2, batch_size=2, lr=1e-2, optimizer="muon")
    optimizer = configure_optimizer(model, cfg, torch.device("cpu"))
    adamw, muon = optimizer.optimizers
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == adapters
    assert not any(g["params"] for g in adamw.param_groups)
    model.train()
    for _ in range(2):  # B = 0 at first: A moves from the second step on
        idx = torch.randint(0, 97, (2, 16))
        optimizer.zero_grad()
        F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == ("lora_" not in name), name


def test_one_step_only_changes_adapters():
    model, _ = lora_model(dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainSettings(max_steps=1, batch_size=2, lr=1e-2)
    optimizer = configure_optimizer(model, cfg, torch.device("cpu"))
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == 4096
    model.train()
    idx = torch.randint(0, 97, (2, 16))
    loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    # B = 0 at first, so A gets no gradient yet while B does
    assert not model.blocks[0].attn.qkv.lora_A.grad.any()
    assert model.blocks[0].attn.qkv.lora_B.grad.any()
    optimizer.step()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert not torch.equal(p, before[name]), name
        elif "lora_" not in name:
            assert torch.equal(p, before[name]), name


def test_merge_gives_the_same_model():
    model, _ = lora_model(dropout=0.2)
    randomize_adapters(model)
    model.eval()
    idx = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        logits = model(idx)
    prompt = [5, 17, 3]
    tokens = generate(model, prompt, 24)
    assert tokens != generate(GPT(CONFIG), prompt, 24)  # the adapters do matter

    merged = merge_lora(model)
    assert merged is model
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), logits, atol=1e-5, rtol=0)
    # 24 new tokens from a context of 16: the KV cache is also rebuilt on the way
    assert generate(merged, prompt, 24) == tokens
    assert generate(merged, prompt, 24, use_cache=False) == tokens
    assert list(merged.state_dict()) == list(GPT(CONFIG).state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    assert merged.lm_head.weight is merged.tok_emb.weight


def test_merged_model_saves_as_a_plain_checkpoint(tmp_path):
    model, _ = lora_model()
    randomize_adapters(model)
    merge_lora(model).eval()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_checkpoint(tmp_path / "ckpt")
    idx = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), model(idx))


def test_compiles():
    model, _ = lora_model()
    randomize_adapters(model)
    model.eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx))


def test_lora_targets_constant():
    assert LORA_TARGETS == ("attn_qkv", "attn_proj", "mlp")
