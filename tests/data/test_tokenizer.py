import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import tiktoken

from pipeline.data.hf_tokenizer import byte_level, merges_from_ranks
from pipeline.data.tokenizer import (
    ENCODING_FILE,
    END_OF_TEXT_ID,
    GPT2_BPE_FILES,
    PATTERNS,
    RANKS_FILE,
    TOKENIZER_FILES,
    VOCAB_SIZE,
    gpt2_ranks,
    gpt2_tokenizer,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_info,
    write_tokenizer,
)
from pipeline.stages.tokenizer import train_ranks

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


# The on-disk format (ranks.tiktoken + encoding.json + tokenizer.json): tiny vocabularies
# trained with rustbpe directly, so each test takes well under a second.

SPECIALS = ("<|endoftext|>", "<|user|>")
TRICKY = [SAMPLE, "45000 1234567", "'s 're I'M", "a\u00a0b\u200bc", "\r\n\n\n  x \t", " ", ""]


@pytest.fixture(scope="module")
def shakespeare(mirror) -> str:
    return (mirror / "tinyshakespeare.txt").read_text()[:200_000]


@pytest.fixture(scope="module")
def gpt2_dir(mirror, tmp_path_factory):
    """GPT-2's ranks written in this format."""
    directory = tmp_path_factory.mktemp("gpt2-new")
    write_tokenizer(directory, gpt2_ranks(mirror / "gpt2-bpe"), "gpt2", "gpt2")
    return directory


def direct_encoding(ranks, pattern, specials=SPECIALS) -> tiktoken.Encoding:
    """The encoding built straight from the ranks, not through the files."""
    return tiktoken.Encoding(
        name="direct",
        pat_str=PATTERNS[pattern],
        mergeable_ranks=ranks,
        special_tokens={s: len(ranks) + i for i, s in enumerate(specials)},
    )


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_a_written_tokenizer_loads_as_the_encoding_of_its_ranks(tmp_path, shakespeare, pattern):
    ranks = train_ranks([shakespeare], 512, pattern)
    assert len(ranks) == 512
    info = write_tokenizer(tmp_path, ranks, "trained", pattern, SPECIALS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TOKENIZER_FILES)
    loaded, direct = load_tokenizer(tmp_path), direct_encoding(ranks, pattern)
    assert info == tokenizer_info(tmp_path)
    assert info.as_dict() == {"kind": "trained", "sha256": info.sha256, "n_vocab": 514,
                              "eot_token": 512}  # fmt: skip
    assert (loaded.n_vocab, loaded.eot_token) == (514, 512)
    assert loaded.encode("<|endoftext|>", allowed_special="all") == [512]
    assert loaded.encode("<|user|>", allowed_special="all") == [513]
    tokens = [loaded.decode_single_token_bytes(i) for i in range(512)]
    assert {token: rank for rank, token in enumerate(tokens)} == ranks
    for text in [shakespeare[-20_000:], *TRICKY]:
        ids = loaded.encode(text, allowed_special="all")
        assert ids == direct.encode(text, allowed_special="all")
        assert loaded.encode_ordinary(text) == direct.encode_ordinary(text)
        assert loaded.decode(ids) == text


def test_the_same_text_and_settings_give_byte_identical_files(tmp_path, mirror, repo):
    """Trained and written twice, in fresh processes with other hash seeds and rayon thread
    counts: the three files are the same bytes."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pipeline.data.tokenizer import write_tokenizer\n"
        "from pipeline.stages.tokenizer import train_ranks\n"
        "text = Path(sys.argv[1]).read_text()[:200_000]\n"
        "texts = [text[i : i + 10_000] for i in range(0, len(text), 10_000)]\n"
        "ranks = train_ranks(texts, 1024, 'gpt4')\n"
        "write_tokenizer(Path(sys.argv[2]), ranks, 'trained', 'gpt4', sys.argv[3:])\n"
    )
    for name, seed, threads in (("a", "1", "2"), ("b", "7", "1")):
        env = {**os.environ, "PYTHONHASHSEED": seed, "RAYON_NUM_THREADS": threads}
        args = [str(mirror / "tinyshakespeare.txt"), str(tmp_path / name), *SPECIALS]
        subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=repo, check=True)
    for name in TOKENIZER_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert load_tokenizer(tmp_path / "a").n_vocab == 1026


def test_gpt2s_merges_are_vocab_bpes_lines_in_order(mirror):
    merges = merges_from_ranks(gpt2_ranks(mirror / "gpt2-bpe"))
    lines = (mirror / "gpt2-bpe" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version") and len(lines) == 50_001
    assert [f"{byte_level(a)} {byte_level(b)}" for a, b in merges] == lines[1:]


def test_gpt2_in_this_format_is_gpt2(mirror, gpt2_dir):
    """The same ids as the old files, and one identity whichever files carry it."""
    old, new = load_tokenizer(mirror / "gpt2-bpe"), load_tokenizer(gpt2_dir)
    text = (mirror / "tinyshakespeare.txt").read_text()
    assert new.encode_ordinary(text) == old.encode_ordinary(text)
    for sample in TRICKY:
        ids = old.encode(sample, allowed_special="all")
        assert new.encode(sample, allowed_special="all") == ids
    assert (new.n_vocab, new.eot_token) == (VOCAB_SIZE, END_OF_TEXT_ID)
    assert tokenizer_info(mirror / "gpt2-bpe") == tokenizer_info(gpt2_dir)
    assert tokenizer_info(gpt2_dir).as_dict()["kind"] == "gpt2"


def test_a_ranks_file_changed_after_writing_is_refused(tmp_path, shakespeare):
    ranks = train_ranks([shakespeare], 300, "gpt4")
    write_tokenizer(tmp_path, ranks, "trained", "gpt4")
    path = tmp_path / RANKS_FILE
    lines = path.read_bytes().splitlines(keepends=True)
    lines[299] = base64.b64encode(b"zzzz") + b" 299\n"  # still a valid ranks file
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: sha256 [^\n]*$"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_rewritten_in_place_is_read_anew(tmp_path, shakespeare):
    """load_tokenizer caches by content, not by path (as tiktoken's own loader does)."""
    texts = [shakespeare[:-20_000], shakespeare[-20_000:]]
    first = load_tokenizer(write_dir(tmp_path, train_ranks(texts[:1], 400, "gpt4")))
    second_ranks = train_ranks(texts[1:], 500, "gpt4")
    second = load_tokenizer(write_dir(tmp_path, second_ranks))
    assert (first.n_vocab, second.n_vocab) == (401, 501)
    direct = direct_encoding(second_ranks, "gpt4", SPECIALS[:1])
    assert second.encode_ordinary(texts[1]) == direct.encode_ordinary(texts[1])
    assert second.encode_ordinary(texts[1]) != first.encode_ordinary(texts[1])


def write_dir(directory, ranks):
    write_tokenizer(directory, ranks, "trained", "gpt4")
    return directory


def test_bad_inputs_are_one_line_naming_what_is_wrong(tmp_path, shakespeare):
    ranks = train_ranks([shakespeare], 300, "gpt2")
    with pytest.raises(ValueError, match=r"the first special token must be <\|endoftext\|>"):
        write_tokenizer(tmp_path, ranks, "trained", "gpt2", ["<|user|>", "<|endoftext|>"])
    gap = {token: rank + (rank >= 100) for token, rank in ranks.items()}
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}: the ranks are not 0\.\."):
        write_tokenizer(tmp_path, gap, "trained", "gpt2")
    assert not any(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match=r"no tokenizer"):
        load_tokenizer(tmp_path)
    write_tokenizer(tmp_path, ranks, "trained", "gpt2")
    encoding = tmp_path / ENCODING_FILE
    encoding.write_text(encoding.read_text().replace('"version": 1', '"version": 2'))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(encoding))}: version 2 .*newer"):
        load_tokenizer(tmp_path)
