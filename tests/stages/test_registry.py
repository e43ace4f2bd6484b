"""The stage registry is the one list of stages: a new stage is one entry plus its module, and
the CLI, the config, the launcher and the DAG all take it from there."""

import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from snakemake_runs import SNAKEMAKE, make_workdir, tiny_config

from pipeline.settings.load import load_config, typed_config
from pipeline.stages.registry import EXTRA_STAGES_ENV, STAGES, training_stages
from pipeline.tracking.headline import Headline

EXTRA_STAGE = '''
"""A hypothetical stage: distil the instruction-tuned model (registry entry + module only)."""
from dataclasses import dataclass

from pipeline.settings.schema import setting
from pipeline.settings import TrainSettings
from pipeline.stages.registry import Stage, fine_tuning_inputs, register


@dataclass
class DistillSettings:
    init_from: str = setting("finetune-instruct", help="the teacher")
    data: str = setting("instruction-data.json")
    temperature: float = setting(2.0, exclusiveMinimum=0)
    train: TrainSettings = setting(TrainSettings())


register(
    Stage(
        "distill", "extra_stage", DistillSettings, trains=True, outputs=("loss.png",),
        inputs=fine_tuning_inputs("distill"),
    )
)


def main(config):
    raise NotImplementedError("a dry run only")
'''


def with_extra_stage(tmp_path: Path) -> dict:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "extra_stage.py").write_text(textwrap.dedent(EXTRA_STAGE))
    path = os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, EXTRA_STAGES_ENV: "extra_stage", "PYTHONPATH": path}


def test_one_name_per_stage_and_every_training_stage_has_settings():
    assert list(training_stages()) == [
        "pretrain", "finetune-classifier", "finetune-instruct", "align-dpo",
    ]  # fmt: skip
    for name, stage in STAGES.items():
        assert stage.rule == name.replace("-", "_")
        assert not stage.trains or stage.settings is not None, name


def test_each_training_stage_ranks_its_models_by_one_headline_metric():
    assert {name: stage.headline for name, stage in training_stages().items()} == {
        "pretrain": Headline("val_loss", higher_is_better=False),
        "finetune-classifier": Headline("test_f1", higher_is_better=True),
        "finetune-instruct": Headline("val_loss", higher_is_better=False),
        "align-dpo": Headline("val_reward_accuracy", higher_is_better=True),
    }
    loss, f1 = Headline("val_loss"), Headline("test_f1", higher_is_better=True)
    assert loss.beats(1.0, 2.0) and not loss.beats(2.0, 1.0) and not loss.beats(1.0, 1.0)
    assert f1.beats(0.9, 0.8) and not f1.beats(0.8, 0.9) and not f1.beats(0.8, 0.8)
    assert loss.beats(5.0, math.nan) and not loss.beats(math.nan, 5.0)
    assert not f1.beats(math.nan, math.nan)
    assert f1.value({"test_f1": 0.5}) == 0.5
    for absent in ({}, {"test_f1": None}, {"test_f1": "0.5"}, {"test_f1": True}):
        assert math.isnan(f1.value(absent)), absent


def test_a_fine_tuning_stage_from_gpt2_weights_reads_them_and_the_bpe_files(tmp_path, repo):
    """Named weights are an input once found (else the stage says where it looked); the stage
    then encodes with the downloaded BPE files. From a stage, only that stage's model."""
    settings = [f"paths.weights={tmp_path}", "finetune-instruct.init_from=gpt2-355m"]
    config = typed_config(load_config([repo / "config.yaml"], settings))
    bpe = ["data/raw/gpt2-bpe/encoder.json", "data/raw/gpt2-bpe/vocab.bpe"]
    instruct, classifier = STAGES["finetune-instruct"].inputs, STAGES["finetune-classifier"].inputs
    assert instruct and classifier
    assert instruct(config) == {"data": "data/raw/instruction-data.json", "model": [], "bpe": bpe}
    (tmp_path / "gpt2-medium").mkdir()
    assert instruct(config)["model"] == [str(tmp_path / "gpt2-medium")]
    assert classifier(config) == {
        "data": "data/raw/SMSSpamCollection",
        "model": "results/pretrain/model",
    }


def test_a_registered_stage_joins_the_config_the_cli_and_the_dag(tmp_path, repo, mirror):
    env = with_extra_stage(tmp_path)
    workdir = make_workdir(tmp_path / "work", repo, tiny_config(mirror))

    shown = subprocess.run(
        [sys.executable, "-m", "pipeline", "config", "--config", "config.yaml",
         "--set", "distill.temperature=3"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    config = yaml.safe_load(shown.stdout)
    assert config["distill"]["temperature"] == 3
    assert config["distill"]["train"]["lr"] == 5.0e-4  # its defaults filled in
    assert config["resources"]["distill"]["runtime"] == 30

    dry = subprocess.run(
        [SNAKEMAKE, "--cores", "2", "--configfile", "tiny.yaml", "--dry-run", "-p",
         "results/distill/metrics.json"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stdout + dry.stderr
    out = dry.stdout
    assert "rule distill:" in out
    assert "input: data/raw/instruction-data.json, results/finetune-instruct/model" in out
    assert "output: results/distill/model, results/distill/metrics.json, " in out
    assert re.search(
        r"python -m pipeline distill --config results/configs/[0-9a-f]{16}\.yaml --threads 2 "
        r"--keep-resume-state 2>&1 \| tee logs/distill\.log logs/attempts/distill\.\$attempt\.log"
        r" \| sed ",
        out,
    )
    assert "rule finetune_instruct:" in out and "rule pretrain:" in out  # what it builds on


def test_building_the_dag_imports_no_torch(repo):
    """The modules the Snakefile imports (config, registry, launcher, tracking, weights lookup)
    stay light, so `snakemake -n` does not pay torch's import."""
    code = textwrap.dedent(
        """
        import sys
        import pipeline.launch, pipeline.paths, pipeline.settings.load, pipeline.tracking
        from pipeline.stages.registry import STAGES
        from pipeline.settings.load import load_config, typed_config
        config = typed_config(load_config(["config.yaml"]))
        for stage in STAGES.values():
            if stage.inputs:
                stage.inputs(config)
        heavy = sorted(m for m in ("torch", "numpy", "mlflow", "tiktoken") if m in sys.modules)
        print(",".join(heavy))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
