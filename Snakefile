"""The pipeline DAG: download -> prepare -> pretrain -> finetune-classifier, and
pretrain -> finetune-instruct -> align-dpo.

Each rule runs one `python -m pipeline <stage>` entry point on the resolved config; the stage's
config section is a rule `params` entry, so changing it reruns that stage and what depends on it.
"""

import os
import sys

from pipeline.config import validate, write_config
from pipeline.paths import Paths
from pipeline.stages.common import init_checkpoint_path
from pipeline.stages.pretrain import init_from_input
from pipeline.tracking import PARENT_RUN_ENV, end_parent_run, start_parent_run


configfile: "config.yaml"


envvars:
    "PATH",


validate(config, source="Snakemake config (config.yaml + --configfile/--config)")

PATHS = Paths.from_config(config)
RESOLVED_CONFIG = str(PATHS.results / "config.resolved.yaml")
# Jobs run `python` from the environment that runs Snakemake, whether or not it is activated.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
TRACKING = config["tracking"]
STAGES_WITH_METRICS = {
    stage: PATHS.stage(stage) / "metrics.json"
    for stage in ("pretrain", "finetune-classifier", "finetune-instruct", "align-dpo")
}


onstart:
    write_config(config, RESOLVED_CONFIG)
    os.environ[PARENT_RUN_ENV] = start_parent_run(TRACKING["uri"], TRACKING["experiment"])


onsuccess:
    if PARENT_RUN_ENV in os.environ:
        end_parent_run(TRACKING["uri"], os.environ[PARENT_RUN_ENV], True, STAGES_WITH_METRICS)


onerror:
    if PARENT_RUN_ENV in os.environ:
        end_parent_run(TRACKING["uri"], os.environ[PARENT_RUN_ENV], False, STAGES_WITH_METRICS)


rule all:
    input:
        [str(path) for path in STAGES_WITH_METRICS.values()],
    default_target: True


rule download:
    output:
        [str(PATHS.source(s["name"])) for s in config["data"]["sources"]],
    params:
        sources=config["data"]["sources"],
        mirrors=config["data"]["mirrors"],
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/download.log",
    benchmark:
        "logs/benchmarks/download.tsv"
    threads: 1
    shell:
        "python -m pipeline download --config {params.config} > {log} 2>&1"


rule prepare:
    input:
        corpus=[str(PATHS.source(name)) for name in config["prepare"]["corpus"]],
        bpe=[str(PATHS.bpe / "encoder.json"), str(PATHS.bpe / "vocab.bpe")],
    output:
        train=str(PATHS.tokens / "train.bin"),
        val=str(PATHS.tokens / "val.bin"),
        meta=str(PATHS.tokens / "meta.json"),
    params:
        prepare=config["prepare"],
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/prepare.log",
    benchmark:
        "logs/benchmarks/prepare.tsv"
    threads: 1
    shell:
        "python -m pipeline prepare --config {params.config} > {log} 2>&1"




rule pretrain:
    input:
        rules.prepare.output,
        # pretrain.init_from's weights directory (none for scratch): checked to exist
        init=init_from_input(config),
    output:
        model=directory(str(PATHS.stage("pretrain") / "model")),
        metrics=str(PATHS.stage("pretrain") / "metrics.json"),
        curves=str(PATHS.stage("pretrain") / "loss.png"),
        samples=str(PATHS.stage("pretrain") / "samples.txt"),
    params:
        model=config["model"],
        pretrain=config["pretrain"],
        seed=config["seed"],
        device=config["device"],
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/pretrain.log",
    benchmark:
        "logs/benchmarks/pretrain.tsv"
    threads: workflow.cores
    shell:
        "python -m pipeline pretrain --config {params.config} --threads {threads} > {log} 2>&1"


CLASSIFIER = config["finetune_classifier"]
CLASSIFIER_DIR = PATHS.stage("finetune-classifier")


rule finetune_classifier:
    input:
        data=str(PATHS.source(CLASSIFIER["data"])),
        model=str(init_checkpoint_path(config, CLASSIFIER["init_from"])),
    output:
        model=directory(str(CLASSIFIER_DIR / "model")),
        metrics=str(CLASSIFIER_DIR / "metrics.json"),
        splits=[str(CLASSIFIER_DIR / f"{split}.tsv") for split in ("train", "val", "test")],
        curves=str(CLASSIFIER_DIR / "loss.png"),
        confusion=str(CLASSIFIER_DIR / "confusion_matrix.png"),
        misclassified=str(CLASSIFIER_DIR / "misclassified.tsv"),
    params:
        finetune_classifier=CLASSIFIER,
        attention=config["model"]["attention"],
        seed=config["seed"],
        device=config["device"],
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/finetune-classifier.log",
    benchmark:
        "logs/benchmarks/finetune-classifier.tsv"
    threads: workflow.cores
    shell:
        "python -m pipeline finetune-classifier --config {params.config} --threads {threads} "
        "> {log} 2>&1"


INSTRUCT = config["finetune_instruct"]
INSTRUCT_DIR = PATHS.stage("finetune-instruct")


rule finetune_instruct:
    input:
        data=str(PATHS.source(INSTRUCT["data"])),
        model=str(init_checkpoint_path(config, INSTRUCT["init_from"])),
    output:
        model=directory(str(INSTRUCT_DIR / "model")),
        metrics=str(INSTRUCT_DIR / "metrics.json"),
        splits=[str(INSTRUCT_DIR / f"{split}.json") for split in ("train", "val", "test")],
        curves=str(INSTRUCT_DIR / "loss.png"),
        responses=str(INSTRUCT_DIR / "test_responses.json"),
    params:
        finetune_instruct=INSTRUCT,
        attention=config["model"]["attention"],
        seed=config["seed"],
        device=config["device"],
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/finetune-instruct.log",
    benchmark:
        "logs/benchmarks/finetune-instruct.tsv"
    threads: workflow.cores
    shell:
        "python -m pipeline finetune-instruct --config {params.config} --threads {threads} "
        "> {log} 2>&1"


DPO = config["align_dpo"]
DPO_DIR = PATHS.stage("align-dpo")


rule align_dpo:
    input:
        data=str(PATHS.source(DPO["data"])),
        model=str(init_checkpoint_path(config, DPO["init_from"])),
    output:
        model=directory(str(DPO_DIR / "model")),
        metrics=str(DPO_DIR / "metrics.json"),
        splits=[str(DPO_DIR / f"{split}.json") for split in ("train", "val", "test")],
        curves=str(DPO_DIR / "loss.png"),
        responses=str(DPO_DIR / "test_responses.json"),
    params:
        align_dpo=DPO,
        attention=config["model"]["attention"],
        seed=config["seed"],
        device=config["device"],
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/align-dpo.log",
    benchmark:
        "logs/benchmarks/align-dpo.tsv"
    threads: workflow.cores
    shell:
        "python -m pipeline align-dpo --config {params.config} --threads {threads} > {log} 2>&1"
