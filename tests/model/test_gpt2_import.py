"""import-gpt2: a Hugging Face or OpenAI TF GPT-2 directory into our checkpoint, tokenizer too."""

import json
import logging
import shutil

import pytest
import torch
from gpt2_reference import SHAPES, bpe, hf_model, logits_of, make_tf_dir, save_hf, tf_variables

from pipeline.data.tokenizer import (
    END_OF_TEXT,
    GPT2_BPE_FILES,
    HF_FILE,
    TOKENIZER_FILES,
    gpt2_ranks,
    gpt2_tokenizer,
    load_tokenizer,
    tokenizer_info,
    write_tokenizer,
)
from pipeline.errors import InputError
from pipeline.io import sha256_file
from pipeline.model import (
    GPT,
    GPTConfig,
    gpt2_import,
    hf,
    load_checkpoint,
    load_checkpoint_config,
    save_checkpoint,
    tf_checkpoint,
)
from pipeline.model.checkpoint import tokenizer_extra_files
from pipeline.serving.inference import Generation, Sampling
from pipeline.stages.tokenizer import train_ranks


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


# --- a checkpoint's own tokenizer, through export-hf and back ---------------------------------


def write_own_tokenizer(kind, mirror, directory):
    """A tokenizer in our format: a small one trained on Tiny Shakespeare with a second special
    token, or GPT-2's ranks as `tokenizer.kind: gpt2` writes them."""
    if kind == "gpt2":
        write_tokenizer(directory, gpt2_ranks(mirror / "gpt2-bpe"), "gpt2", "gpt2")
    else:
        text = (mirror / "tinyshakespeare.txt").read_text()[:100_000]
        ranks = train_ranks([text], 400, "gpt4")
        write_tokenizer(directory, ranks, "trained", "gpt4", [END_OF_TEXT, "<|user|>"])
    return directory


@pytest.fixture(scope="module", params=["trained", "gpt2"])
def own_tokenizer(request, mirror, tmp_path_factory):
    return write_own_tokenizer(request.param, mirror, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def trained_tokenizer(mirror, tmp_path_factory):
    return write_own_tokenizer("trained", mirror, tmp_path_factory.mktemp("trained"))


def export_with_tokenizer(tokenizer_dir, tmp_path):
    """export-hf of a tiny checkpoint trained (as stages save it) with that tokenizer."""
    info = tokenizer_info(tokenizer_dir)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=info.n_vocab, context_length=16, n_layer=1, n_head=2, n_embd=16)
    ckpt = save_checkpoint(GPT(config), tmp_path / "trained", {"tokenizer": info.as_dict()},
                           extra_files=tokenizer_extra_files(tokenizer_dir))  # fmt: skip
    return hf.export_hf(ckpt, tmp_path / "hf")


def test_import_of_an_export_keeps_the_checkpoints_own_tokenizer(tmp_path, own_tokenizer,
                                                                 monkeypatch):  # fmt: skip
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no-cache"))  # nothing to download
    src = export_with_tokenizer(own_tokenizer, tmp_path)
    out = gpt2_import.import_gpt2(src, tmp_path / "imported")
    assert load_checkpoint_config(out)["tokenizer"] == tokenizer_info(own_tokenizer).as_dict()
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(TOKENIZER_FILES)
    for name in TOKENIZER_FILES:  # the same bytes: the same identity (sha256) and ranks
        assert (out / "tokenizer" / name).read_bytes() == (own_tokenizer / name).read_bytes()
    generation = Generation(out, device="cpu")
    text = "ROMEO: But soft, what light <|endoftext|> breaks? <|user|> naïve"
    original = load_tokenizer(own_tokenizer)
    ids = generation.tokenizer.encode(text, allowed_special="all")
    assert ids == original.encode(text, allowed_special="all")
    assert generation.tokenizer.decode(ids) == text
    assert len(list(generation.stream("ROMEO:", Sampling(max_new_tokens=4), stop_at_eot=False)))
    again = hf.export_hf(out, tmp_path / "hf-again")
    for name in (HF_FILE, "tokenizer_config.json"):
        assert (again / name).read_bytes() == (src / name).read_bytes()


def test_import_refuses_a_tokenizer_that_does_not_fit_the_model(tmp_path, trained_tokenizer):
    src = export_with_tokenizer(trained_tokenizer, tmp_path)
    config = json.loads((src / "config.json").read_text())
    n_vocab = config["vocab_size"]
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": n_vocab + 1}))
    with pytest.raises(InputError, match=rf"tokenizer.json: the tokenizer has {n_vocab} ids but "
                       rf".*vocab_size {n_vocab + 1}"):  # fmt: skip
        gpt2_import.import_gpt2(src, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


def test_import_refuses_a_tokenizer_json_it_cannot_read(tmp_path, trained_tokenizer, mirror):
    src = export_with_tokenizer(trained_tokenizer, tmp_path)
    ours = json.loads((src / HF_FILE).read_text())
    fewer_merges = {**ours, "model": {**ours["model"], "merges": ours["model"]["merges"][:-1]}}
    other_split = json.loads(json.dumps(ours).replace("Split", "Whitespace"))
    cases = {
        "not json": "expected a byte-level BPE tokenizer.json",
        json.dumps({**ours, "model": {"type": "WordPiece"}}): "expected a byte-level BPE",
        json.dumps(other_split): "expected a byte-level BPE",
        json.dumps(fewer_merges): "differ from what export-hf writes",
    }
    for i, (content, message) in enumerate(cases.items()):
        (src / HF_FILE).write_text(content)
        with pytest.raises(InputError, match=rf"{src / HF_FILE}: .*{message}"):
            gpt2_import.import_gpt2(src, tmp_path / f"imported{i}")
    # HF's own GPT-2 directories carry tokenizer.json too: vocab.json + merges.txt win there
    gpt2 = save_hf(hf_model(SHAPES[0]), tmp_path / "gpt2")
    hf_style_tokenizer(mirror, gpt2)
    (gpt2 / HF_FILE).write_text("not json")
    out = gpt2_import.import_gpt2(gpt2, tmp_path / "gpt2-ckpt")
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(GPT2_BPE_FILES)
