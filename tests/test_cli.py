import subprocess
import sys

import yaml

from pipeline.cli import main, stream_text, stream_until
from pipeline.data.tokenizer import gpt2_tokenizer


def test_streamed_text_never_splits_a_character(mirror):
    tokenizer = gpt2_tokenizer(mirror / "gpt2-bpe")
    text = "naïve 日本語 🚀 done"
    ids = tokenizer.encode_ordinary(text)
    assert any(
        len(tokenizer.decode_single_token_bytes(t).decode("utf-8", "replace")) == 1
        and "\ufffd" in tokenizer.decode_single_token_bytes(t).decode("utf-8", "replace")
        for t in ids
    )  # some token holds only part of a character
    pieces = list(stream_text(iter(ids), tokenizer))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_config_command_prints_the_resolved_config(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["config", "--set", "pretrain.train.max_steps=9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pretrain"]["train"]["max_steps"] == 9


def test_bad_config_exits_1_with_the_key_and_no_traceback(repo):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "prepare", "--set", "prepare.val_fraction=2"],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "prepare.val_fraction: 2 is greater than or equal to the maximum of 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_stream_until_stops_at_a_marker_split_across_pieces():
    pieces = ["The answer", " is 4.\n\n#", "## Instr", "uction: more"]
    assert "".join(stream_until(iter(pieces), ["\n\n### "])) == "The answer is 4."
    # text that only looks like the start of a marker is released once it cannot be one
    out = list(stream_until(iter(["a\n", "\nb", "c"]), ["\n\n### "]))
    assert "".join(out) == "a\n\nbc" and out[0] == "a"
    assert "".join(stream_until(iter(["ab", "c"]), ["<|user|>"])) == "abc"
