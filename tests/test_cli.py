import json
import subprocess
import sys

import yaml

from pipeline.cli import main


def test_config_command_prints_the_resolved_config(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    assert main(["config", "--set", "pretrain.train.max_steps=90"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pretrain"]["train"]["max_steps"] == 90


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
