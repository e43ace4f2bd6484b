import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from pipeline.cli import main
from pipeline.data.corpus import CorpusFile
from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.data.tokens import gather_parts, tokenize_part


def test_config_command_prints_the_resolved_config(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["config", "--set", "pretrain.train.max_steps=90"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pretrain"]["train"]["max_steps"] == 90


def test_config_command_shows_the_presets_model_sizes(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["config", "--set", "model.preset=gpt2-355m", "--set", "model.n_layer=2"]) == 0
    out = capsys.readouterr().out
    model = out[out.index("\nmodel:\n") :].split("\n")[2:12]
    assert [line for line in model if "#" in line] == [
        "  context_length: null  # preset gpt2-355m: 1024",
        "  n_head: null  # preset gpt2-355m: 16",
        "  n_embd: null  # preset gpt2-355m: 1024",
        "  qkv_bias: null  # preset gpt2-355m: true",
    ]
    assert "  n_layer: 2" in model  # an override is the value itself
    assert yaml.safe_load(out)["model"]["n_head"] is None  # still the resolved config


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


def test_config_command_shows_every_default_and_the_schema(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["config", "--defaults"]) == 0
    assert capsys.readouterr().out == (repo / "config.yaml").read_text()
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    lr = schema["properties"]["pretrain"]["properties"]["train"]["properties"]["lr"]
    assert lr["default"] == 1.0e-3 and lr["exclusiveMinimum"] == 0


def test_every_registered_stage_is_a_command():
    from pipeline.cli import build_parser
    from pipeline.stages.registry import STAGES

    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(STAGES) <= set(commands)


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(repo, capsys, monkeypatch):
    import dataclasses

    import pytest

    from pipeline.errors import InputError
    from pipeline.stages import registry

    def stage_raising(error: Exception):
        def main(config, **options):
            raise error

        module = type(sys)("fake_stage")
        module.main = main
        monkeypatch.setitem(sys.modules, "fake_stage", module)
        return dataclasses.replace(registry.STAGES["prepare"], module="fake_stage")

    monkeypatch.chdir(repo)
    monkeypatch.setitem(registry.STAGES, "prepare", stage_raising(InputError("data.csv:3: bad")))
    assert main(["prepare"]) == 1
    assert capsys.readouterr().err == "error: data.csv:3: bad\n"
    monkeypatch.setitem(registry.STAGES, "prepare", stage_raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["prepare"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, mirror):
    """A tiny language model and a classifier made from it, with GPT-2's tokenizer files."""
    import torch

    from pipeline.model import GPT, GPTConfig, save_checkpoint
    from pipeline.model.checkpoint import tokenizer_extra_files
    from pipeline.model.classifier import GPTClassifier

    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=16, n_layer=1, n_head=2, n_embd=16))
    tokenizer = tokenizer_extra_files(mirror / "gpt2-bpe")
    save_checkpoint(model, root / "lm", {}, tokenizer)
    classifier = GPTClassifier.from_language_model(model, ["ham", "spam"])
    head = {"classifier": {"labels": ["ham", "spam"]}}
    save_checkpoint(classifier, root / "classifier", head, tokenizer)
    return root


def one_error_line(capsys) -> str:
    """The one `error: ...` line a user fault ends in (and nothing else on stderr)."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_a_malformed_set_value_is_one_line_naming_the_key_and_the_value(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["config", "--set", "pretrain.train.lr=[1e-3"]) == 1
    assert one_error_line(capsys).startswith(
        "error: --set pretrain.train.lr: value '[1e-3' is not valid YAML"
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_says_which_devices_there_are(checkpoints, capsys):
    args = ["generate", "--checkpoint", str(checkpoints / "lm"), "--prompt", "hi"]
    assert main([*args, "--device", "cuda"]) == 1
    line = one_error_line(capsys)
    assert line.startswith("error: --device 'cuda': CUDA is not available here")
    assert line.endswith("available devices: cpu (or auto, which picks the best of them)")


def test_an_empty_classify_input_names_the_file(checkpoints, tmp_path, capsys):
    empty = tmp_path / "texts.txt"
    empty.write_text("")
    args = ["classify", "--checkpoint", str(checkpoints / "classifier"), "--input", str(empty)]
    assert main(args) == 1
    assert one_error_line(capsys).startswith(f"error: {empty}: no texts to classify")


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--checkpoint", "README.md", "--prompt", "hi"],
        ["chat", "--checkpoint", "README.md", "--instruction", "hi"],
        ["classify", "--checkpoint", "README.md", "hi"],
        ["export-hf", "README.md", "exported"],
    ],
    ids=lambda args: args[0],
)
def test_a_file_given_as_the_checkpoint_is_said_to_be_a_file(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("# a project\n")
    assert main(args) == 1
    assert one_error_line(capsys) == "error: README.md is a file, not a checkpoint directory"
    assert not (tmp_path / "exported").exists()


def test_an_unknown_attention_backend_names_the_option(checkpoints, capsys):
    args = ["classify", "--checkpoint", str(checkpoints / "classifier"), "a text"]
    assert main([*args, "--attention", "bogus"]) == 1
    assert one_error_line(capsys) == (
        "error: --attention: unknown backend 'bogus'; expected auto or one of "
        "fused, sdpa, simple, causal, multihead"
    )
    assert main([*args, "--attention", "sdpa"]) == 0
    assert capsys.readouterr().out.startswith("label\tprobability\ttext\n")


def test_a_full_disk_names_the_path_being_written(checkpoints, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError, which is not an OSError."""
    from safetensors import SafetensorError

    import pipeline.model.hf as hf

    def disk_full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(hf, "save_file", disk_full)
    out = tmp_path / "exported"
    assert main(["export-hf", str(checkpoints / "lm"), str(out)]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: no space left on device writing {out} (")
    assert "MB free there); free some space" in line
    assert not out.exists() and not list(tmp_path.glob(".exported.*"))


def test_exported_files_follow_the_umask(checkpoints, tmp_path):
    """safetensors writes 0600; a shared results folder needs the umask's mode."""
    old = os.umask(0o027)
    try:
        assert main(["export-hf", str(checkpoints / "lm"), str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


@pytest.mark.parametrize(
    "args",
    [["generate", "--prompt", "ROMEO:", "--max-new-tokens", "5"], ["classify", "hi", "there"]],
    ids=lambda args: args[0],
)
def test_a_reader_that_is_gone_ends_the_command_silently_as_sigpipe_would(args, checkpoints,
                                                                          repo):  # fmt: skip
    """`... | head -1`: the pipe's reader has exited before the output is written (its read end
    is closed here before the command starts, so the first write fails every time)."""
    checkpoint = checkpoints / ("lm" if args[0] == "generate" else "classifier")
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", *args, "--checkpoint", str(checkpoint)],
            cwd=repo, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(repo), "PIPELINE_LOG_LEVEL": "WARNING"},
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE, done.stderr  # as a shell reports `cat`'s
    assert done.stderr == ""


def test_verify_checks_every_shard_and_names_a_damaged_one(repo, mirror, tmp_path, capsys):
    tokenizer = gpt2_tokenizer(mirror / "gpt2-bpe")
    verdict = CorpusFile(mirror / "the-verdict.txt", "text")
    tokenize_part([verdict], tmp_path / "part", tokenizer, workers=1, split="tail",
                  val_fraction=0.1)  # fmt: skip
    token_dir = tmp_path / "data" / "tokens"
    meta = gather_parts([tmp_path / "part"], token_dir, mirror / "gpt2-bpe", split="tail",
                        val_fraction=0.1, shard_tokens=2000)  # fmt: skip
    config = str(repo / "config.yaml")
    args = ["verify", "--config", config, "--set", f"paths.data={token_dir.parent}"]
    assert main(args) == 0
    total = meta["train_tokens"] + meta["val_tokens"]
    assert capsys.readouterr().out == (
        f"{token_dir}: 4 shards, {total:,} tokens, match meta.json (sizes and sha256)\n"
    )
    shard = token_dir / "train-00001.bin"
    with open(shard, "r+b") as handle:
        handle.seek(1000)
        handle.write(bytes(16))
    assert main(args) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {shard}: sha256 differs from meta.json's: the file changed after prepare wrote it",
        "error: 1 of 4 token shards damaged; rerun prepare: snakemake --cores all -R prepare, or "
        "python -m pipeline prepare",
    ]
