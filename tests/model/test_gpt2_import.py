"""import-gpt2: a Hugging Face or OpenAI TF GPT-2 directory into our checkpoint, tokenizer too."""

import json
import logging
import shutil

import torch
from gpt2_reference import SHAPES, bpe, hf_model, logits_of, make_tf_dir, save_hf, tf_variables

from pipeline.data.tokenizer import GPT2_BPE_FILES, gpt2_tokenizer
from pipeline.io import sha256_file
from pipeline.model import gpt2_import, load_checkpoint, load_checkpoint_config, tf_checkpoint


def hf_style_tokenizer(mirror, dst) -> None:
    """GPT-2's BPE files as HF writes them: compact vocab.json, merges.txt with its own header."""
    encoder = json.loads((mirror / "gpt2-bpe" / "encoder.json").read_text())
    (dst / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False, separators=(",", ":")))
    merges = (mirror / "gpt2-bpe" / "vocab.bpe").read_text().splitlines()[1:]
    header = "#version: 0.2 - Trained by `huggingface/tokenizers`\n"
    (dst / "merges.txt").write_text(header + "\n".join(merges))


def test_import_gpt2_from_hf_writes_our_checkpoint_with_tokenizer(tmp_path, mirror):
    reference = hf_model(SHAPES[2])
    src = save_hf(reference, tmp_path / "src")
    hf_style_tokenizer(mirror, src)
    assert (src / "vocab.json").read_bytes() != (mirror / "gpt2-bpe" / "encoder.json").read_bytes()
    out = gpt2_import.import_gpt2(src, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    config = load_checkpoint_config(out)
    assert config["stage"] == "import" and config["source"] == str(src)
    assert config["tokenizer"] == {"kind": "gpt2", "n_vocab": 50257, "eot_token": 50256}
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
    with caplog.at_level(logging.WARNING, logger="pipeline.model.gpt2_import"):
        out = gpt2_import.import_gpt2(src, tmp_path / "ckpt")
    assert "merges.txt is not GPT-2's vocab.bpe" in caplog.text
    assert not (out / "tokenizer").exists()


def test_import_gpt2_from_tf_layout(tmp_path, monkeypatch, mirror):
    reference = hf_model(SHAPES[1])
    src = make_tf_dir(tmp_path / "tf", reference)
    for name in GPT2_BPE_FILES:
        shutil.copyfile(mirror / "gpt2-bpe" / name, src / name)
    variables = tf_variables(reference)
    monkeypatch.setattr(tf_checkpoint, "_read_tf_variables", lambda prefix: variables)
    out = gpt2_import.import_gpt2(src, tmp_path / "ckpt")
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(GPT2_BPE_FILES)
    model = load_checkpoint(out).eval()
    idx = torch.randint(0, 97, (1, 16))
    torch.testing.assert_close(logits_of(model, idx), logits_of(reference, idx), atol=1e-5, rtol=0)
