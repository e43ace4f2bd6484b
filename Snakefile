"""The pipeline DAG: download -> prepare -> pretrain -> finetune-classifier, and
pretrain -> finetune-instruct -> align-dpo.

Each rule runs one `python -m pipeline <stage>` entry point on the resolved config; the stage's
config section is a rule `params` entry, so changing it reruns that stage and what depends on it.
A training stage is launched as `pipeline/launch.py` says (one process, torchrun, or srun +
torchrun) and asks for `resources.<stage>`; neither is a rerun trigger.
"""

import os
import sys

from snakemake.exceptions import WorkflowError

from pipeline.config import validate, write_config
from pipeline.launch import rule_resources, stage_command, stage_name, stage_params
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


# On a cluster these run where Snakemake runs: `all` does nothing, and `download` needs the
# internet (or the mirror), which compute nodes often lack.
localrules:
    all,
    download,


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


def stage_threads(section: str) -> int:
    """`resources.<section>.threads`, or every core Snakemake was given (a local run)."""
    threads = config["resources"][section]["threads"]
    if threads is not None:
        return threads
    try:
        return workflow.cores
    except WorkflowError:
        raise WorkflowError(
            f"resources.{section}.threads is null (all of --cores) but Snakemake has no --cores:"
            " on a cluster, set each training stage's resources.<stage>.threads"
        ) from None


def stage_resources(section: str) -> dict:
    return rule_resources(config["resources"][section], config[section]["train"])


def launch_command(section: str):
    """The rule's command as a params function of `threads`: Snakemake passes the job's actual
    threads, and a param that takes them is not a rerun trigger (nor is the shell template)."""

    def command(wildcards, threads: int) -> str:
        return stage_command(
            stage_name(section),
            config[section]["train"],
            threads,
            RESOLVED_CONFIG,
            gpus_per_node=config["resources"][section]["gpu"],
        )

    return command


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
        pretrain=stage_params(config["pretrain"]),
        seed=config["seed"],
        device=config["device"],
        command=launch_command("pretrain"),
    log:
        "logs/pretrain.log",
    benchmark:
        "logs/benchmarks/pretrain.tsv"
    threads: stage_threads("pretrain")
    resources:
        **stage_resources("pretrain"),
    shell:
        "{params.command} > {log} 2>&1"


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
        finetune_classifier=stage_params(CLASSIFIER),
        attention=config["model"]["attention"],
        seed=config["seed"],
        device=config["device"],
        command=launch_command("finetune_classifier"),
    log:
        "logs/finetune-classifier.log",
    benchmark:
        "logs/benchmarks/finetune-classifier.tsv"
    threads: stage_threads("finetune_classifier")
    resources:
        **stage_resources("finetune_classifier"),
    shell:
        "{params.command} > {log} 2>&1"


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
        finetune_instruct=stage_params(INSTRUCT),
        attention=config["model"]["attention"],
        seed=config["seed"],
        device=config["device"],
        command=launch_command("finetune_instruct"),
    log:
        "logs/finetune-instruct.log",
    benchmark:
        "logs/benchmarks/finetune-instruct.tsv"
    threads: stage_threads("finetune_instruct")
    resources:
        **stage_resources("finetune_instruct"),
    shell:
        "{params.command} > {log} 2>&1"


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
        align_dpo=stage_params(DPO),
        attention=config["model"]["attention"],
        seed=config["seed"],
        device=config["device"],
        command=launch_command("align_dpo"),
    log:
        "logs/align-dpo.log",
    benchmark:
        "logs/benchmarks/align-dpo.tsv"
    threads: stage_threads("align_dpo")
    resources:
        **stage_resources("align_dpo"),
    shell:
        "{params.command} > {log} 2>&1"
