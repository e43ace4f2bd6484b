import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.data.tokenizer import (
    END_OF_TEXT_ID,
    GPT2_BPE_FILES,
    gpt2_tokenizer,
    token_byte_lengths,
)

URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
SAMPLE = (
    "Hello, world!  It's 2026: naïve café — 日本語 🚀\n\tROMEO: tabs\r\nand <|endoftext|> as text"
)


def test_offline_encoding_matches_tiktoken_get_encoding(tmp_path, mirror):
    """tiktoken's own `get_encoding("gpt2")` path (its cache pre-filled with the mirrored files,
    keyed as tiktoken keys them) must give exactly our offline encoding's ids."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    for name, url in URLS.items():
        shutil.copy(mirror / "gpt2-bpe" / name, cache / hashlib.sha1(url.encode()).hexdigest())
    texts = [SAMPLE, (mirror / "the-verdict.txt").read_text()[:5000]]
    code = (
        "import json, sys, tiktoken\n"
        "enc = tiktoken.get_encoding('gpt2')\n"
        "print(json.dumps([enc.encode_ordinary(t) for t in json.loads(sys.stdin.read())]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env={**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)},
        check=True,
    )
    online = json.loads(out.stdout)
    offline = gpt2_tokenizer(mirror / "gpt2-bpe")
    assert [offline.encode_ordinary(t) for t in texts] == online
    assert offline.n_vocab == 50257 and offline.eot_token == END_OF_TEXT_ID
    assert offline.decode(offline.encode_ordinary(SAMPLE)) == SAMPLE
    assert offline.encode("<|endoftext|>", allowed_special="all") == [END_OF_TEXT_ID]


def test_wrong_bpe_files_fail_with_the_directory(tmp_path, mirror):
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    shutil.copy(mirror / "gpt2-bpe" / "encoder.json", bpe / "encoder.json")
    (bpe / "vocab.bpe").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match=str(bpe)):
        gpt2_tokenizer(bpe)
    (bpe / "vocab.bpe").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.bpe"):
        gpt2_tokenizer(bpe)
    assert set(GPT2_BPE_FILES) == {"encoder.json", "vocab.bpe"}


def test_token_byte_lengths_add_up_to_the_texts_utf8_bytes(mirror):
    tokenizer = gpt2_tokenizer(mirror / "gpt2-bpe")
    lengths = token_byte_lengths(tokenizer)
    assert len(lengths) == tokenizer.n_vocab and lengths[END_OF_TEXT_ID] == 0
    for text in (SAMPLE, "naïve café — 東京 🙂", " ROMEO:\nBut soft!"):
        ids = tokenizer.encode_ordinary(text)
        assert sum(lengths[i] for i in ids) == len(text.encode("utf-8"))
    assert min(lengths[:END_OF_TEXT_ID]) >= 1
