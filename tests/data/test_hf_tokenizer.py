"""The tokenizer's Hugging Face file: `transformers` reading tokenizer.json, on its own or as an
exported directory, gives exactly tiktoken's ids for trained vocabularies and for GPT-2."""

import json
import random
import shutil

import pytest

from pipeline.data.hf_tokenizer import tokenizer_config
from pipeline.data.tokenizer import (
    ENCODING_FILE,
    END_OF_TEXT,
    HF_FILE,
    gpt2_ranks,
    load_tokenizer,
    write_tokenizer,
)
from pipeline.stages.tokenizer import train_ranks

TRICKY = [
    "naïve café — 東京 😀 ß ﬁ",
    "non\u00a0breaking \u00a0 space, zero\u200bwidth",
    "runs   of    spaces\t\ttabs \t mixed",
    "   leading and trailing   ",
    "\tx\t",
    "windows\r\nlines\r\n",
    "\n\n\n",
    "a\n\n\nb  \n  c",
    "45000 1234567 3.14159",
    "'s 're I'M he's they'RE 'll",
    "x<|endoftext|>y <|endoftext|>",
    "<|endoftext|><|user|> <|user|>",
    "",
    " ",
    "end.\nNext a:\n\nb x  \n y",
]


def random_texts(count: int = 300) -> list[str]:
    rng = random.Random(29)
    alphabet = "ab é東😀 \t\n\r.,'!0123"
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 40))) for _ in range(count)]


TEXTS = TRICKY + random_texts()
TRAINED = {"gpt4": (1024, [END_OF_TEXT, "<|user|>"]), "gpt2": (600, [END_OF_TEXT])}
"""Trained vocabularies by pattern: size and special tokens."""


@pytest.fixture(scope="module", params=["trained-gpt4", "trained-gpt2", "gpt2"])
def tokenizer_dir(request, mirror, tmp_path_factory):
    """A tokenizer written in this format: a ~1k gpt4-pattern vocabulary with a second special
    token, a gpt2-pattern one (both trained on Tiny Shakespeare and the test texts, so digits,
    whitespace and non-ASCII bytes merge too), and GPT-2 itself."""
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        write_tokenizer(directory, gpt2_ranks(mirror / "gpt2-bpe"), "gpt2", "gpt2")
        return directory
    pattern = request.param.removeprefix("trained-")
    text = (mirror / "tinyshakespeare.txt").read_text()[:200_000] + "\n".join(TEXTS) * 3
    size, specials = TRAINED[pattern]
    write_tokenizer(directory, train_ranks([text], size, pattern), "trained", pattern, specials)
    return directory


def exported(directory, out):
    """The tokenizer as export-hf writes it: tokenizer.json + tokenizer_config.json."""
    out.mkdir()
    shutil.copyfile(directory / HF_FILE, out / HF_FILE)
    specials = json.loads((directory / ENCODING_FILE).read_text())["special_tokens"]
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(specials, END_OF_TEXT)))
    return out


def test_transformers_encodes_as_tiktoken(tokenizer_dir, tmp_path):
    import transformers  # deferred: a dev dependency, slow to import

    tiktoken_encoding = load_tokenizer(tokenizer_dir)
    readers = {
        "tokenizer_file": transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_dir / HF_FILE)
        ),
        "exported": transformers.AutoTokenizer.from_pretrained(
            exported(tokenizer_dir, tmp_path / "hf")
        ),
    }
    for how, hf in readers.items():
        for text in TEXTS:
            ids = tiktoken_encoding.encode(text, allowed_special="all")
            assert hf(text, add_special_tokens=False).input_ids == ids, (how, text)
            assert hf.decode(ids) == text, (how, text)
    assert readers["exported"].eos_token_id == tiktoken_encoding.eot_token


def test_split_special_tokens_encodes_as_encode_ordinary(tokenizer_dir, tmp_path):
    import transformers  # deferred: a dev dependency, slow to import

    tiktoken_encoding = load_tokenizer(tokenizer_dir)
    readers = [
        transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_dir / HF_FILE), split_special_tokens=True
        ),
        transformers.AutoTokenizer.from_pretrained(
            exported(tokenizer_dir, tmp_path / "hf"), split_special_tokens=True
        ),
    ]
    for hf in readers:
        for text in TEXTS:
            ids = tiktoken_encoding.encode_ordinary(text)
            assert hf.encode(text, add_special_tokens=False) == ids, text
