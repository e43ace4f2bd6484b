import errno
import json
import os

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import pipeline.model.checkpoint as checkpoint
from pipeline.errors import NoSpaceError
from pipeline.model import GPT, GPTConfig, load_checkpoint, load_checkpoint_config, save_checkpoint


def tiny(**overrides):
    fields = dict(vocab_size=97, context_length=16, n_layer=2, n_head=4, n_embd=32)
    fields.update(overrides)
    return GPTConfig(**fields)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(tiny()).eval()


@pytest.fixture
def saved(model, tmp_path):
    return save_checkpoint(model, tmp_path / "ckpt", {"tokenizer": "gpt2", "stage": "pretrain"})


def test_round_trip_gives_identical_logits(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(saved).eval()
    idx = torch.randint(0, 97, (2, 16))
    assert torch.equal(loaded(idx), model(idx))
    assert loaded.config == model.config


def test_config_json_holds_format_model_and_metadata(model, saved):
    config = load_checkpoint_config(saved)
    assert config["format"] == "gpt-pipeline-checkpoint"
    assert config["version"] == 1
    assert config["model"] == model.config.to_dict()
    assert config["tokenizer"] == "gpt2" and config["stage"] == "pretrain"


def test_tied_head_stored_once_and_tied_after_load(saved):
    tensors = load_file(saved / "model.safetensors")
    assert "lm_head.weight" not in tensors and "tok_emb.weight" in tensors
    loaded = load_checkpoint(saved)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    with torch.no_grad():
        loaded.tok_emb.weight[3, 0] = 123.0
    assert loaded.lm_head.weight[3, 0] == 123.0
    assert loaded.num_parameters() == GPT(tiny()).num_parameters()


def test_attention_is_chosen_after_loading_and_not_saved(saved):
    loaded = load_checkpoint(saved)
    assert loaded.attention == "sdpa"
    assert "attention" not in load_checkpoint_config(saved)["model"]
    loaded.set_attention("multihead")
    assert loaded.attention == "multihead"


def test_a_checkpoint_that_records_an_attention_backend_still_loads(model, saved):
    config_file = saved / "config.json"
    meta = json.loads(config_file.read_text())
    meta["model"]["attention"] = "fused"  # as written before attention became a run-time choice
    config_file.write_text(json.dumps(meta))
    idx = torch.randint(0, 97, (1, 8))
    assert torch.equal(load_checkpoint(saved)(idx), model(idx))


def test_replaces_existing_checkpoint_atomically(model, saved):
    torch.manual_seed(1)
    other = GPT(tiny()).eval()
    save_checkpoint(other, saved, {"stage": "finetune"})
    assert load_checkpoint_config(saved)["stage"] == "finetune"
    idx = torch.randint(0, 97, (1, 8))
    assert torch.equal(load_checkpoint(saved)(idx), other(idx))
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_failed_write_leaves_old_checkpoint_intact(model, saved, monkeypatch):
    before = (saved / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(GPT(tiny()), saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(model, tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "important.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like a checkpoint"):
        save_checkpoint(model, tmp_path / "results")
    assert (tmp_path / "results" / "important.txt").exists()


def test_reserved_metadata_keys(model, tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, tmp_path / "c", {"model": "mine"})
    assert not (tmp_path / "c").exists()


def test_missing_directory_and_files(model, saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "config.json is not valid JSON"),
        ('{"format": "other", "version": 1, "model": {}}', "format"),
        ('{"format": "gpt-pipeline-checkpoint", "version": 9, "model": {}}', "version 9"),
        ('{"format": "gpt-pipeline-checkpoint", "version": 1}', "'model'"),
    ],
)
def test_bad_config_json(saved, text, match):
    (saved / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(saved)


def test_bad_model_section_names_the_file_and_field(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model"]["n_layers"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json.*n_layers"):
        load_checkpoint(saved)


def test_truncated_weights(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors could not be read"):
        load_checkpoint(saved)


def edit_tensors(saved, edit):
    path = saved / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(saved):
    edit_tensors(saved, lambda t: t.pop("blocks.1.mlp.fc.bias"))
    match = r"model.safetensors is missing tensor\(s\): blocks.1.mlp.fc.bias"
    with pytest.raises(ValueError, match=match):
        load_checkpoint(saved)


def test_unexpected_tensor_is_named(saved):
    edit_tensors(saved, lambda t: t.update(extra=torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\): extra"):
        load_checkpoint(saved)


def test_misshaped_tensor_is_named(saved):
    edit_tensors(saved, lambda t: t.update({"ln_f.weight": torch.ones(33)}))
    with pytest.raises(ValueError, match=r"ln_f.weight has shape \(33,\).*\(32,\)"):
        load_checkpoint(saved)


def test_extra_files_are_copied_into_the_checkpoint(model, tmp_path):
    (tmp_path / "vocab.bpe").write_text("merges")
    saved = save_checkpoint(
        model, tmp_path / "ckpt", extra_files={"tokenizer/vocab.bpe": tmp_path / "vocab.bpe"}
    )
    assert (saved / "tokenizer" / "vocab.bpe").read_text() == "merges"
    load_checkpoint(saved)
    for bad in ("../escape.txt", "/abs.txt", "config.json"):
        with pytest.raises(ValueError, match="extra file name"):
            save_checkpoint(model, tmp_path / "other", extra_files={bad: tmp_path / "vocab.bpe"})
    with pytest.raises(FileNotFoundError):
        save_checkpoint(model, saved, extra_files={"missing.txt": tmp_path / "missing.txt"})
    assert (saved / "tokenizer" / "vocab.bpe").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "vocab.bpe"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
    ],
)
def test_a_full_disk_is_named_with_the_checkpoint_path(model, saved, monkeypatch, error):
    before = (saved / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(NoSpaceError) as raised:
        save_checkpoint(GPT(tiny()), saved)
    assert str(raised.value).startswith(f"no space left on device writing {saved} (")
    assert raised.value.errno == errno.ENOSPC and raised.value.__cause__ is error
    assert (saved / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ckpt"]


def test_checkpoint_files_follow_the_umask(model, tmp_path):
    old = os.umask(0o027)
    try:
        saved = save_checkpoint(model, tmp_path / "ckpt", extra_files={"notes.txt": __file__})
    finally:
        os.umask(old)
    assert saved.stat().st_mode & 0o777 == 0o750
    for path in saved.iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, path
