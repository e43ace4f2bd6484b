"""GPT-2 import (Hugging Face, OpenAI TF) and export to Hugging Face, checked with transformers."""

import dataclasses
import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.data.tokenizer import GPT2_BPE_FILES, gpt2_tokenizer
from pipeline.io import sha256_file
from pipeline.model import (
    ATTENTION_BACKENDS,
    GPT,
    PRESETS,
    GPTConfig,
    hf,
    load_checkpoint,
    load_checkpoint_config,
    save_checkpoint,
)
from pipeline.model.attention import resolve_attention
from pipeline.model.generate import generate

transformers = pytest.importorskip("transformers")
GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

# (n_layer, n_head, n_embd, n_positions, vocab_size)
SHAPES = [(1, 1, 8, 8, 50), (2, 4, 32, 16, 97), (3, 2, 24, 32, 300)]
FORMATS = ["safetensors", "bin", "legacy-bin", "sharded"]


def _randomize(named_params, seed: int) -> None:
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
    _randomize(model.named_parameters(), seed)
    return model


def our_model(seed: int = 0, **overrides) -> GPT:
    fields = dict(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_embd=32)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**fields)).eval()
    _randomize(model.named_parameters(), seed)
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


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """One saved HF model shared by the error tests (copied before being damaged)."""
    model = hf_model(SHAPES[1])
    return save_hf(model, tmp_path_factory.mktemp("hf") / "gpt2"), model


def damaged_copy(hf_dir, tmp_path):
    src, _ = hf_dir
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


# --- import -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_import_matches_transformers_logits_with_every_backend(tmp_path, shape, fmt):
    reference = hf_model(shape, seed=sum(shape))
    src = save_hf(reference, tmp_path / "src", fmt)
    model = hf.load_hf_gpt2(src).eval()
    n_layer, n_head, n_embd, n_positions, vocab_size = shape
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == shape[:3]
    assert (model.config.context_length, model.config.vocab_size) == (n_positions, vocab_size)
    assert model.lm_head.weight is model.tok_emb.weight
    idx = torch.randint(0, vocab_size, (2, n_positions), generator=torch.Generator().manual_seed(1))
    expected = logits_of(reference, idx)
    for backend in ATTENTION_BACKENDS:
        model.set_attention(backend)
        torch.testing.assert_close(logits_of(model, idx), expected, atol=1e-5, rtol=0)


def test_import_config_keeps_both_dropouts(hf_dir):
    src, _ = hf_dir
    model = hf.load_hf_gpt2(src)
    assert (model.config.dropout, model.config.attn_dropout) == (0.1, 0.1)
    # with attention dropout, `auto` trains with sdpa: the fused op has none
    assert resolve_attention("auto", torch.device("cpu"), model.config.attn_dropout) == "sdpa"


def test_greedy_generation_matches_transformers(tmp_path):
    reference = hf_model((3, 4, 32, 32, 97), seed=3)  # a seed whose greedy text varies
    model = hf.load_hf_gpt2(save_hf(reference, tmp_path / "src"))
    prompt = [5, 17, 3, 40]
    with torch.no_grad():
        theirs = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=20, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert len(theirs) == 20 and len(set(theirs)) > 3
    for backend in ATTENTION_BACKENDS:
        model.set_attention(backend)
        assert generate(model, prompt, 20, temperature=0.0) == theirs, backend


def tf_variables(model: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """What OpenAI's checkpoint holds for this model: TF names, conv1d weights (1, in, out)."""
    state = model.state_dict()
    out = {}
    for _, hf_name, tf_name, conv in hf._name_table(model.config.n_layer):
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


@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: "x".join(map(str, s)))
def test_tf_mapping_matches_transformers_logits(tmp_path, monkeypatch, shape):
    reference = hf_model(shape, seed=7)
    variables = tf_variables(reference)
    src = make_tf_dir(tmp_path / "tf", reference)
    read = []
    monkeypatch.setattr(hf, "_read_tf_variables", lambda prefix: read.append(prefix) or variables)
    model = hf.load_tf_gpt2(src).eval()
    assert read == [src / "model.ckpt"]
    assert (model.config.dropout, model.config.attn_dropout) == (0.0, 0.0)
    idx = torch.randint(0, shape[4], (2, shape[3]))
    torch.testing.assert_close(logits_of(model, idx), logits_of(reference, idx), atol=1e-5, rtol=0)


def test_tf_mapping_reports_every_problem_by_tf_name():
    reference = hf_model(SHAPES[1])
    variables = tf_variables(reference)
    del variables["model/h1/mlp/c_fc/b"]
    variables["model/h0/attn/c_attn/w"] = variables["model/h0/attn/c_attn/w"][0]  # no leading 1
    variables["model/h0/attn/c_attn/w/Adam"] = np.zeros(3)
    config = GPTConfig(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_embd=32)
    with pytest.raises(ValueError) as err:
        hf.state_dict_from_tf(variables, config, source="ckpt/model.ckpt")
    msg = str(err.value)
    assert "ckpt/model.ckpt" in msg
    assert "missing: model/h1/mlp/c_fc/b" in msg
    assert "unexpected: model/h0/attn/c_attn/w/Adam" in msg
    assert "model/h0/attn/c_attn/w (expected (1, 32, 96), found (32, 96))" in msg


def test_tf_without_tensorflow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    src = make_tf_dir(tmp_path / "tf", hf_model(SHAPES[0]))
    with pytest.raises(ImportError, match=r"pip install 'gpt-pipeline\[tf\]'") as err:
        hf.load_tf_gpt2(src)
    assert isinstance(err.value, hf.TensorFlowRequiredError)
    with pytest.raises(hf.TensorFlowRequiredError):
        hf.import_gpt2(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- import errors ----------------------------------------------------------------------------


def test_every_missing_unexpected_and_misshaped_tensor_is_named(hf_dir, tmp_path):
    src = damaged_copy(hf_dir, tmp_path)
    path = src / "model.safetensors"
    tensors = load_file(path)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    del tensors["transformer.ln_f.weight"]
    tensors["transformer.h.7.attn.c_attn.weight"] = torch.zeros(32, 96)
    tensors["transformer.wpe.weight"] = torch.zeros(17, 32)
    tensors["transformer.h.0.attn.c_proj.weight"] = torch.zeros(32, 33)
    save_file(tensors, path)
    with pytest.raises(ValueError) as err:
        hf.load_hf_gpt2(src)
    msg = str(err.value)
    assert str(path) in msg
    assert "2 missing: transformer.ln_f.weight, transformer.h.1.mlp.c_fc.bias" in msg
    assert "1 unexpected: transformer.h.7.attn.c_attn.weight" in msg
    assert "transformer.wpe.weight (expected (16, 32), found (17, 32))" in msg
    assert "transformer.h.0.attn.c_proj.weight (expected (32, 32), found (32, 33))" in msg


def test_config_that_does_not_fit_the_weights_lists_all_tensors(hf_dir, tmp_path):
    src = damaged_copy(hf_dir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "n_layer": 3, "vocab_size": 98}))
    with pytest.raises(ValueError, match=r"12 missing: transformer\.h\.2\.ln_1\.weight") as err:
        hf.load_hf_gpt2(src)
    assert "transformer.wte.weight (expected (98, 32), found (97, 32))" in str(err.value)


def test_a_tensor_stored_twice_is_unexpected(hf_dir, tmp_path):
    src = damaged_copy(hf_dir, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["wte.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"1 unexpected: (transformer\.)?wte\.weight \(duplicate\)"
    ):
        hf.load_hf_gpt2(src)


def test_untied_lm_head_is_refused(hf_dir, tmp_path):
    src = damaged_copy(hf_dir, tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(ValueError, match="lm_head.weight differs from transformer.wte.weight"):
        hf.load_hf_gpt2(src)
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    save_file(tensors, src / "model.safetensors")
    hf.load_hf_gpt2(src)  # an equal, explicitly stored head is fine


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_weights_name_the_file(hf_dir, tmp_path, fmt):
    src, model = hf_dir
    src = save_hf(model, tmp_path / "src", fmt)
    path = src / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path}.*could not be read"):
        hf.load_hf_gpt2(src)


class _Payload:
    """Pickles as a call to _mark: what a malicious .bin would run on a plain torch.load."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_mark, (str(self.path),))


def _mark(path):
    open(path, "w").close()


def test_bin_is_never_unpickled_as_code(hf_dir, tmp_path):
    src = damaged_copy(hf_dir, tmp_path)
    (src / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save(
        {"transformer.wte.weight": torch.zeros(1), "x": _Payload(marker)}, src / "pytorch_model.bin"
    )
    with pytest.raises(ValueError, match=r"weights_only=True\) refused it: .*test_hf\._mark"):
        hf.load_hf_gpt2(src)
    assert not marker.exists()


def test_missing_files_raise_file_not_found(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        hf.load_hf_gpt2(tmp_path / "nope")
    src = damaged_copy(hf_dir, tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        hf.load_hf_gpt2(src)
    (src / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(src / "config.json")):
        hf.load_hf_gpt2(src)
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        hf.import_gpt2(src, tmp_path / "out")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"n_inner": 64}, "n_inner"),
        ({"model_type": "gpt_neo"}, "model_type"),
        ({"n_head": 5}, "divisible"),
    ],
)
def test_unsupported_config_is_refused_before_reading_weights(tmp_path, change, match):
    src = tmp_path / "src"
    src.mkdir()
    config = GPT2Config(n_layer=1, n_head=4, n_embd=32, n_positions=16, vocab_size=97)
    (src / "config.json").write_text(json.dumps({**config.to_dict(), **change}))
    with pytest.raises(ValueError, match=match) as err:
        hf.load_hf_gpt2(src)
    assert str(src / "config.json") in str(err.value)


# --- import_gpt2 ------------------------------------------------------------------------------


def hf_style_tokenizer(mirror, dst) -> None:
    """GPT-2's BPE files as HF writes them: compact vocab.json, merges.txt with its own header."""
    encoder = json.loads((mirror / "gpt2-bpe" / "encoder.json").read_text())
    (dst / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False, separators=(",", ":")))
    merges = (mirror / "gpt2-bpe" / "vocab.bpe").read_text().splitlines()[1:]
    header = "#version: 0.2 - Trained by `huggingface/tokenizers`\n"
    (dst / "merges.txt").write_text(header + "\n".join(merges))


def bpe(mirror):
    return gpt2_tokenizer(mirror / "gpt2-bpe")


def test_import_gpt2_from_hf_writes_our_checkpoint_with_tokenizer(tmp_path, mirror):
    reference = hf_model(SHAPES[2])
    src = save_hf(reference, tmp_path / "src")
    hf_style_tokenizer(mirror, src)
    assert (src / "vocab.json").read_bytes() != (mirror / "gpt2-bpe" / "encoder.json").read_bytes()
    out = hf.import_gpt2(src, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    config = load_checkpoint_config(out)
    assert config["stage"] == "import" and config["source"] == str(src)
    assert config["tokenizer"] == {"name": "gpt2", "eot_token": 50256}
    assert "attention" not in config["model"]
    for name, digest in GPT2_BPE_FILES.items():
        assert sha256_file(out / "tokenizer" / name) == digest
    text = "ROMEO: hi"
    assert gpt2_tokenizer(out / "tokenizer").encode(text) == bpe(mirror).encode(text)
    model = load_checkpoint(out).eval()
    idx = torch.randint(0, 300, (1, 32))
    torch.testing.assert_close(logits_of(model, idx), logits_of(reference, idx), atol=1e-5, rtol=0)


def test_import_skips_tokenizer_files_that_are_not_gpt2s(tmp_path, mirror, caplog):
    src = save_hf(hf_model(SHAPES[0]), tmp_path / "src")
    hf_style_tokenizer(mirror, src)
    merges = (src / "merges.txt").read_text().splitlines()
    (src / "merges.txt").write_text("\n".join(merges[:-1]))
    with caplog.at_level(logging.WARNING, logger="pipeline.model.hf"):
        out = hf.import_gpt2(src, tmp_path / "ckpt")
    assert "merges.txt is not GPT-2's vocab.bpe" in caplog.text
    assert not (out / "tokenizer").exists()


def test_import_gpt2_from_tf_layout(tmp_path, monkeypatch, mirror):
    reference = hf_model(SHAPES[1])
    src = make_tf_dir(tmp_path / "tf", reference)
    for name in GPT2_BPE_FILES:
        shutil.copyfile(mirror / "gpt2-bpe" / name, src / name)
    variables = tf_variables(reference)
    monkeypatch.setattr(hf, "_read_tf_variables", lambda prefix: variables)
    out = hf.import_gpt2(src, tmp_path / "ckpt")
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(GPT2_BPE_FILES)
    model = load_checkpoint(out).eval()
    idx = torch.randint(0, 97, (1, 16))
    torch.testing.assert_close(logits_of(model, idx), logits_of(reference, idx), atol=1e-5, rtol=0)


# --- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, qkv_bias):
    model = our_model(qkv_bias=qkv_bias, dropout=0.1, attn_dropout=0.05)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = hf.export_hf(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    theirs, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs.eval()
    c = theirs.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size) == (2, 4, 32, 16, 97)
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.1, 0.1, 0.05)
    assert c.tie_word_embeddings and c.bos_token_id is None  # 50256 is outside this vocab
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    if not qkv_bias:
        assert not theirs.transformer.h[0].attn.c_attn.bias.any()
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(logits_of(theirs, idx), logits_of(model, idx), atol=1e-5, rtol=0)


def test_hf_to_ours_to_hf_round_trip_is_exact(tmp_path):
    reference = hf_model(SHAPES[2])
    ckpt = hf.import_gpt2(save_hf(reference, tmp_path / "src"), tmp_path / "ckpt")
    out = hf.export_hf(ckpt, tmp_path / "hf")
    tensors = load_file(out / "model.safetensors")
    expected = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    assert tensors.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name


def test_export_with_tokenizer_loads_in_transformers(tmp_path, mirror):
    model = our_model(vocab_size=50257, n_layer=1, n_embd=16, n_head=2)
    files = {f"tokenizer/{n}": mirror / "gpt2-bpe" / n for n in GPT2_BPE_FILES}
    metadata = {"tokenizer": {"name": "gpt2", "eot_token": 50256}}
    ckpt = save_checkpoint(model, tmp_path / "ckpt", metadata, extra_files=files)
    out = hf.export_hf(ckpt, tmp_path / "hf")
    assert (out / "merges.txt").read_bytes() == (mirror / "gpt2-bpe" / "vocab.bpe").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 50256
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "ROMEO: But soft, what light <|endoftext|> breaks?"
    assert tokenizer(text)["input_ids"] == bpe(mirror).encode(text, allowed_special="all")
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.model_max_length == 16


def test_export_replaces_only_its_own_output(tmp_path):
    ckpt = save_checkpoint(our_model(), tmp_path / "ckpt")
    out = hf.export_hf(ckpt, tmp_path / "hf")
    other = save_checkpoint(our_model(seed=1), tmp_path / "ckpt2")
    hf.export_hf(other, out)  # an earlier export is replaced
    assert torch.equal(
        load_file(out / "model.safetensors")["transformer.wte.weight"],
        load_checkpoint(other).tok_emb.weight,
    )
    (tmp_path / "empty").mkdir()
    hf.export_hf(ckpt, tmp_path / "empty")  # so is an empty directory
    for target in (ckpt, tmp_path / "notes"):
        target.mkdir(exist_ok=True)
        (target / "keep.txt").write_text("mine")
        with pytest.raises(FileExistsError, match="refusing to replace"):
            hf.export_hf(ckpt, target)
        assert (target / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        hf.export_hf(ckpt, tmp_path / "file")


def test_export_refuses_a_classifier_checkpoint(tmp_path):
    ckpt = save_checkpoint(our_model(), tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["classifier.weight"] = torch.zeros(2, 32)
    tensors["classifier.bias"] = torch.zeros(2)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="only language models export to GPT2LMHeadModel"):
        hf.export_hf(ckpt, tmp_path / "hf")
    head = {"classifier": {"labels": ["ham", "spam"], "pooling": "last"}}
    ckpt = save_checkpoint(our_model(), tmp_path / "ckpt2", metadata=head)
    with pytest.raises(ValueError, match="classifier section in config"):
        hf.export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --- names and sizes --------------------------------------------------------------------------


def test_preset_names_map_both_ways():
    assert set(hf.HF_NAME_FOR_PRESET) == {p for p in PRESETS if p.startswith("gpt2-")}
    for preset, name in hf.HF_NAME_FOR_PRESET.items():
        assert hf.PRESET_FOR_HF_NAME[name] == preset
        assert hf.PRESET_FOR_HF_NAME[f"openai-community/{name}"] == preset


@pytest.mark.parametrize("preset", list(hf.HF_NAME_FOR_PRESET))
def test_preset_parameter_counts_equal_transformers(preset):
    config = GPTConfig.from_preset(preset)
    hf_cfg = GPT2Config(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_positions=config.context_length,
        vocab_size=config.vocab_size,
    )
    with torch.device("meta"):
        ours = GPT(config).num_parameters()
        theirs = GPT2LMHeadModel(hf_cfg).num_parameters()
    assert ours == theirs
    imported = hf.config_from_hf(hf_cfg.to_dict())
    assert imported == dataclasses.replace(config, dropout=0.1, attn_dropout=0.1)


# --- nanoGPT ----------------------------------------------------------------------------------

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
    state = hf.state_dict_from_nanogpt(nanogpt_state(reference, compiled), config)
    model = GPT(config).eval()
    result = model.load_state_dict(state, strict=False)
    assert list(result.missing_keys) == ["lm_head.weight"] and not result.unexpected_keys
    idx = torch.randint(0, config.vocab_size, (2, config.context_length),
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(logits_of(model, idx), logits_of(reference, idx), atol=1e-5, rtol=0)


def test_nanogpt_state_dict_in_conv1d_layout_is_named_as_misshaped():
    reference = hf_model(SHAPES[1])
    with pytest.raises(ValueError, match=r"wrong shape: transformer\.h\.0\.attn\.c_attn\.weight"):
        hf.state_dict_from_nanogpt(reference.state_dict(), _nanogpt_config(SHAPES[1]))
