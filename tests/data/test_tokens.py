"""Token files: documents joined with <|endoftext|>, the tail and by-document splits, shards
read as one array, and the same bytes whatever the number of parts or workers; a shard that
differs from meta.json (overwritten, cut short) refused by name before it is read."""

import hashlib
import json

import numpy as np
import pytest

from pipeline.data import corpus
from pipeline.data import tokens as token_files
from pipeline.data.corpus import CorpusFile, split_into_parts
from pipeline.data.tokenizer import gpt2_tokenizer, load_tokenizer, tokenizer_info
from pipeline.data.tokens import (
    TokenShards,
    gather_parts,
    in_val,
    load_tokens,
    tokenize_part,
)
from pipeline.errors import InputError


@pytest.fixture(scope="module")
def bpe(mirror):
    return mirror / "gpt2-bpe"


@pytest.fixture(scope="module")
def tokenizer(bpe):
    return gpt2_tokenizer(bpe)


def texts(tmp_path, *contents: str) -> list[CorpusFile]:
    files = []
    for i, content in enumerate(contents):
        path = tmp_path / f"doc{i:02d}.txt"
        path.write_text(content)
        files.append(CorpusFile(path, "text"))
    return files


def prepare(files, out, bpe, *, parts=1, workers=1, split="tail", val=0.25, shard=1 << 20):
    """Tokenize `files` with the tokenizer in `bpe` (GPT-2's files) into out/tokens."""
    groups = split_into_parts(files, parts)
    dirs = []
    for i, group in enumerate(groups):
        dirs.append(out / "parts" / f"{i}")
        tokenize_part(group, dirs[-1], load_tokenizer(bpe), workers=workers, split=split,
                      val_fraction=val)  # fmt: skip
    return gather_parts(
        dirs, out / "tokens", bpe, split=split, val_fraction=val, shard_tokens=shard
    )


def test_documents_are_joined_with_end_of_text_and_the_tail_is_val(tmp_path, tokenizer, bpe):
    files = texts(tmp_path, "First document. " * 20, "Second one here. " * 20)
    meta = prepare(files, tmp_path, bpe)
    ids = [tokenizer.encode_ordinary(f.path.read_text()) for f in files]
    expected = ids[0] + [tokenizer.eot_token] + ids[1]
    train, val = load_tokens(tmp_path / "tokens", "train"), load_tokens(tmp_path / "tokens", "val")
    assert train.dtype == np.uint16
    assert list(train[np.arange(len(train))]) + list(val[np.arange(len(val))]) == expected
    assert len(val) == round(len(expected) * 0.25)
    saved = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert saved == meta and meta["split"] == "tail"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert [r["tokens"] for r in meta["inputs"]] == [len(i) for i in ids]
    assert [r["documents"] for r in meta["inputs"]] == [1, 1]
    assert meta["inputs"][0]["bytes"] == files[0].path.stat().st_size
    assert len(meta["inputs"][0]["sha256"]) == 64
    assert meta["tokenizer"]["kind"] == "gpt2" and meta["vocab_size"] == 50257
    assert meta["tokenizer"] == tokenizer_info(bpe).as_dict()
    assert sorted(p.name for p in (tmp_path / "tokens" / "tokenizer").iterdir()) == [
        "encoder.json", "vocab.bpe"]  # fmt: skip


def test_the_document_split_keeps_documents_whole_and_stable(tmp_path, tokenizer, bpe):
    docs = [f"Document number {i} talks about topic {i * 7 % 11}. " * 5 for i in range(40)]
    meta = prepare(texts(tmp_path, *docs), tmp_path / "a", bpe, split="documents", val=0.3)
    chosen = [d for d in docs if in_val(d, 0.3)]
    assert 0 < len(chosen) < len(docs)
    eot = [tokenizer.eot_token]
    expected_val = sum((eot + tokenizer.encode_ordinary(d) for d in chosen), [])[1:]
    val = load_tokens(tmp_path / "a" / "tokens", "val")
    assert list(val[np.arange(len(val))]) == expected_val
    assert meta["val_tokens"] == len(expected_val)
    # adding documents moves none of the old ones between the splits
    more = docs + [f"A later addition {i}. " * 5 for i in range(10)]
    (tmp_path / "b").mkdir()
    prepare(texts(tmp_path / "b", *more), tmp_path / "b", bpe, split="documents", val=0.3)
    later = load_tokens(tmp_path / "b" / "tokens", "val")
    later_ids = list(later[np.arange(len(later))])
    assert later_ids[: len(expected_val)] == expected_val


def shard_bytes(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}


@pytest.mark.parametrize("split", ["tail", "documents"])
def test_parts_workers_and_shards_do_not_change_the_bytes(tmp_path, tokenizer, split, bpe):
    docs = [f"Paragraph {i}: " + "words and more words " * (5 + i % 13) for i in range(60)]
    files = texts(tmp_path, *docs)
    one = prepare(files, tmp_path / "one", bpe, split=split, shard=500)
    three = prepare(files, tmp_path / "three", bpe, parts=3, workers=2, split=split,
                    shard=500)  # fmt: skip
    assert len(one["shards"]["train"]) > 1  # the cut falls inside documents and parts
    assert shard_bytes(tmp_path / "one" / "tokens") == shard_bytes(tmp_path / "three" / "tokens")
    assert one == three


def test_shards_read_as_one_array(tmp_path):
    whole = np.arange(1000, dtype=np.uint16)
    parts = np.split(whole, [300, 301, 700])
    shards = TokenShards(parts)
    assert len(shards) == 1000
    index = np.array([[0, 299, 300, 301], [699, 700, 999, 5]])
    assert np.array_equal(shards[index], whole[index])
    assert np.array_equal(shards[298:303], whole[298:303])


def test_an_interrupted_part_leaves_nothing_to_read(tmp_path, tokenizer, monkeypatch):
    files = texts(tmp_path, "one two three " * 2000, "four five " * 2000)
    monkeypatch.setattr(token_files, "BATCH_CHARS", 10)  # one batch per document
    calls = []

    def encode_then_die(text, **special):
        calls.append(len(text))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return tokenizer.encode_to_numpy(text, **special)

    class Dying:
        name, n_vocab, eot_token = tokenizer.name, tokenizer.n_vocab, tokenizer.eot_token
        encode_to_numpy = staticmethod(encode_then_die)

    with pytest.raises(KeyboardInterrupt):
        tokenize_part(files, tmp_path / "part", Dying(), workers=1, split="tail", val_fraction=0.1)
    assert not (tmp_path / "part").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".part")] == []


def test_too_small_a_corpus_is_a_clear_error(tmp_path, tokenizer, bpe):
    with pytest.raises(ValueError, match="too few"):
        prepare(texts(tmp_path, "hi"), tmp_path, bpe, val=0.1)
    with pytest.raises(FileNotFoundError, match="token index not found"):
        load_tokens(tmp_path / "nowhere", "train")


def test_batches_in_flight_keep_the_order_and_special_text_stays_text(
    tmp_path, tokenizer, monkeypatch, bpe
):
    docs = [f"Note {i}: <|endoftext|> is only text here. " * (1 + i % 4) for i in range(30)]
    files = texts(tmp_path, *docs)
    whole = prepare(files, tmp_path / "whole", bpe, split="documents", val=0.3)
    monkeypatch.setattr(token_files, "BATCH_CHARS", 50)  # a batch per document or two
    batched = prepare(files, tmp_path / "batched", bpe, workers=2, split="documents",
                      val=0.3)  # fmt: skip
    assert whole == batched
    assert shard_bytes(tmp_path / "whole" / "tokens") == shard_bytes(
        tmp_path / "batched" / "tokens"
    )
    assert [r["tokens"] for r in whole["inputs"]] == [
        len(tokenizer.encode_ordinary(d)) for d in docs
    ]


def test_long_documents_in_pieces_give_the_same_tokens(tmp_path, tokenizer, monkeypatch, bpe):
    docs = [
        f"Chapter {i}. " + "Some words, and then some more.\n" * (40 + 30 * i) for i in range(8)
    ]
    files = texts(tmp_path, *docs)
    whole = prepare(files, tmp_path / "whole", bpe, workers=2)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 300)
    monkeypatch.setattr(corpus, "_READ_BYTES", 200)
    monkeypatch.setattr(token_files, "BATCH_CHARS", 700)
    pieces = prepare(files, tmp_path / "pieces", bpe, workers=2)
    assert pieces == whole
    assert shard_bytes(tmp_path / "whole" / "tokens") == shard_bytes(tmp_path / "pieces" / "tokens")
    # by document: each document whole in the split its first piece's hash chose
    meta = prepare(files, tmp_path / "docs", bpe, split="documents", val=0.5)
    val = load_tokens(tmp_path / "docs" / "tokens", "val")
    first_pieces = [next(corpus.read_documents(f, corpus.FileReport()))[0] for f in files]
    assert all(len(p) < len(d) for p, d in zip(first_pieces, docs, strict=True))
    chosen = [d for d, p in zip(docs, first_pieces, strict=True) if in_val(p, 0.5)]
    assert 0 < len(chosen) < len(docs) and len(val) == meta["val_tokens"]
    eot = [tokenizer.eot_token]
    assert (
        list(val[np.arange(len(val))])
        == sum((eot + tokenizer.encode_ordinary(d) for d in chosen), [])[1:]
    )


def test_a_skipped_empty_file_is_counted_in_the_token_index(tmp_path, tokenizer, bpe):
    files = texts(tmp_path, "Some words here. " * 40, "", "More words there. " * 40)
    groups = split_into_parts(files, 1)
    tokenize_part(groups[0], tmp_path / "part", tokenizer, workers=1, split="tail",
                  val_fraction=0.25, skip_bad=True)  # fmt: skip
    meta = gather_parts([tmp_path / "part"], tmp_path / "tokens", bpe, split="tail",
                        val_fraction=0.25, shard_tokens=1 << 20)  # fmt: skip
    assert [r["skipped"] for r in meta["inputs"]] == [{}, {"empty": 1}, {}]
    assert [r["documents"] for r in meta["inputs"]] == [1, 0, 1]


def test_the_realised_val_fraction_is_recorded_and_a_far_one_explained(tmp_path, tokenizer, bpe):
    big = "A long book, chapter after chapter. " * 3000
    small = [f"Short note {i} on a topic. " * 10 for i in range(40)]
    assert not in_val(big, 0.1)  # the big document is in train: val is far below 10%
    meta = prepare(texts(tmp_path, big, *small), tmp_path / "docs", bpe,
                   split="documents", val=0.1)  # fmt: skip
    realised = meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"])
    assert meta["val_fraction_realised"] == pytest.approx(realised) and realised < 0.05
    warning = token_files.val_split_warning(meta)
    assert warning is not None
    assert f"{100 * realised:.1f}% of the tokens" in warning and "10.0%" in warning
    assert "whole documents" in warning and "val_split: tail" in warning
    tail = prepare(texts(tmp_path, big, *small), tmp_path / "tail", bpe, split="tail",
                   val=0.1)  # fmt: skip
    assert tail["val_fraction_realised"] == pytest.approx(0.1, abs=1e-3)
    assert token_files.val_split_warning(tail) is None


@pytest.fixture
def sharded(tmp_path, tokenizer, bpe):
    """A token directory of several train shards, and its meta.json."""
    docs = [f"Paragraph {i}: " + "words and more words " * (5 + i % 13) for i in range(40)]
    meta = prepare(texts(tmp_path, *docs), tmp_path, bpe, shard=500)
    assert len(meta["shards"]["train"]) > 1
    return tmp_path / "tokens", meta


def test_meta_json_records_each_shards_tokens_bytes_and_sha256(sharded):
    token_dir, meta = sharded
    for record in meta["shards"]["train"] + meta["shards"]["val"]:
        data = (token_dir / record["file"]).read_bytes()
        assert record["bytes"] == len(data) == 2 * record["tokens"]
        assert record["sha256"] == hashlib.sha256(data).hexdigest()


def overwrite_16_bytes(path):
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(b"\xff" * 16)


def truncate(path, size):
    with open(path, "r+b") as handle:
        handle.truncate(size)


def test_an_overwritten_shard_is_refused_before_training_naming_it(sharded):
    token_dir, _ = sharded
    shard = token_dir / "train-00001.bin"
    overwrite_16_bytes(shard)
    with pytest.raises(InputError) as raised:
        load_tokens(token_dir, "train")
    message = str(raised.value)
    assert message.startswith(f"{shard}: sha256 differs from meta.json's")
    assert "rerun prepare" in message and "\n" not in message
    assert len(load_tokens(token_dir, "val")) > 0  # the other split is not refused for it


def test_a_shard_one_token_short_is_refused_with_the_counts(sharded):
    token_dir, meta = sharded
    shard, tokens = token_dir / "train-00000.bin", meta["shards"]["train"][0]["tokens"]
    truncate(shard, 2 * (tokens - 1))
    with pytest.raises(InputError, match=r"train-00000.bin: expected 500 tokens from meta.json, "
                                         r"found 499; rerun prepare"):  # fmt: skip
        load_tokens(token_dir, "train")


def test_a_shard_cut_to_an_odd_size_is_one_line_naming_it(sharded):
    token_dir, _ = sharded
    shard = token_dir / "val-00000.bin"
    truncate(shard, shard.stat().st_size - 1)
    with pytest.raises(InputError) as raised:
        load_tokens(token_dir, "val")
    assert str(raised.value).startswith(f"{shard}: ")
    assert "not a whole number of 2-byte tokens" in str(raised.value)
    assert "\n" not in str(raised.value)
