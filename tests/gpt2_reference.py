"""Transformers' GPT2LMHeadModel as the reference for GPT-2 import and export: small random
models saved in the layouts found in the wild. Importing it skips a test module without
transformers."""

import json

import numpy as np
import pytest
import torch

from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.model.gpt2_tensors import name_table

transformers = pytest.importorskip("transformers")
GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

# (n_layer, n_head, n_embd, n_positions, vocab_size)
SHAPES = [(1, 1, 8, 8, 50), (2, 4, 32, 16, 97), (3, 2, 24, 32, 300)]


def randomize(named_params, seed: int) -> None:
    """Non-trivial values everywhere (HF inits biases to 0 and LayerNorms to 1, hiding bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            base = 1.0 if ("ln" in name and name.endswith("weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def hf_model(shape, seed: int = 0) -> GPT2LMHeadModel:
    n_layer, n_head, n_embd, n_positions, vocab_size = shape
    config = GPT2Config(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=n_positions,
        vocab_size=vocab_size,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(config).eval()
    randomize(model.named_parameters(), seed)
    return model


def save_hf(model: GPT2LMHeadModel, path, fmt: str = "safetensors"):
    """The directory layouts found in the wild, including pre-4.31 pickles with mask buffers."""
    if fmt == "sharded":
        model.save_pretrained(path, max_shard_size="20KB")
        return path
    model.save_pretrained(path)
    if fmt == "safetensors":
        return path
    (path / "model.safetensors").unlink()
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if fmt == "legacy-bin":
        n = model.config.n_positions
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        for i in range(model.config.n_layer):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        state["lm_head.weight"] = state["wte.weight"].clone()
    # 2019's uploads also predate torch's zip format
    legacy = {"_use_new_zipfile_serialization": False} if fmt == "legacy-bin" else {}
    torch.save(state, path / "pytorch_model.bin", **legacy)
    return path


def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def tf_variables(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """What OpenAI's checkpoint holds for this model: TF names, conv1d weights (1, in, out)."""
    state = model.state_dict()
    out = {}
    for _, hf_name, tf_name, conv in name_table(model.config.n_layer):
        value = state[f"transformer.{hf_name}"].numpy()
        out[tf_name] = value[None] if conv else value
    return out


def make_tf_dir(path, model: GPT2LMHeadModel):
    path.mkdir()
    c = model.config
    hparams = dict(n_vocab=c.vocab_size, n_ctx=c.n_positions, n_embd=c.n_embd)
    hparams.update(n_head=c.n_head, n_layer=c.n_layer)
    (path / "hparams.json").write_text(json.dumps(hparams))
    for suffix in ("index", "meta", "data-00000-of-00001"):
        (path / f"model.ckpt.{suffix}").write_bytes(b"")
    return path


def bpe(mirror):
    return gpt2_tokenizer(mirror / "gpt2-bpe")
