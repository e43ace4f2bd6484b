"""GPT-2 import from and export to Hugging Face, checked with transformers."""

import dataclasses
import json
import shutil

import pytest
import torch
from gpt2_reference import SHAPES, bpe, hf_model, logits_of, randomize, save_hf
from safetensors.torch import load_file, save_file

from pipeline.data.tokenizer import GPT2_BPE_FILES
from pipeline.model import (
    ATTENTION_BACKENDS,
    GPT,
    PRESETS,
    GPTConfig,
    gpt2_import,
    hf,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.model.attention import choose_attention
from pipeline.model.generate import generate

transformers = pytest.importorskip("transformers")
GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

FORMATS = ["safetensors", "bin", "legacy-bin", "sharded"]


def our_model(seed: int = 0, **overrides) -> GPT:
    fields = dict(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_embd=32)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**fields)).eval()
    randomize(model.named_parameters(), seed)
    return model


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
    assert choose_attention("auto", torch.device("cpu"), model.config.attn_dropout).name == "sdpa"


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
        gpt2_import.import_gpt2(src, tmp_path / "out")


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
    ckpt = gpt2_import.import_gpt2(save_hf(reference, tmp_path / "src"), tmp_path / "ckpt")
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
