import json

import numpy as np
import pytest

from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.data.tokens import load_tokens, prepare_corpus


@pytest.fixture(scope="module")
def tokenizer(mirror):
    return gpt2_tokenizer(mirror / "gpt2-bpe")


def test_documents_are_joined_with_end_of_text_and_split(tmp_path, tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("First document. " * 20)
    b.write_text("Second one here. " * 20)
    meta = prepare_corpus([a, b], tmp_path / "tokens", tokenizer, val_fraction=0.25)
    ids_a, ids_b = (
        tokenizer.encode_ordinary(a.read_text()),
        tokenizer.encode_ordinary(b.read_text()),
    )
    expected = ids_a + [tokenizer.eot_token] + ids_b
    train, val = (
        load_tokens(tmp_path / "tokens" / "train.bin"),
        load_tokens(tmp_path / "tokens" / "val.bin"),
    )
    assert train.dtype == np.uint16
    assert list(train) + list(val) == expected
    assert len(val) == round(len(expected) * 0.25)
    saved = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert saved == meta
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert [d["file"] for d in meta["documents"]] == ["a.txt", "b.txt"]
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert len(meta["documents"][0]["sha256"]) == 64


def test_too_small_corpus_and_bad_text_are_clear_errors(tmp_path, tokenizer):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi")
    with pytest.raises(ValueError, match="too few to split"):
        prepare_corpus([tiny], tmp_path / "t", tokenizer, 0.1)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="bin.txt: not UTF-8"):
        prepare_corpus([binary], tmp_path / "t", tokenizer, 0.1)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_tokens(tmp_path / "missing.bin")
