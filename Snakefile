"""The pipeline DAG: download -> tokenizer -> prepare (tokenize x prepare.scatter, then gather)
-> pretrain -> finetune-classifier, and pretrain -> finetune-instruct -> align-dpo; once prepare
has run, tokenizer_report measures the tokenizer on the val split and the fine-tuning data.

Each rule runs one `python -m pipeline <stage>` entry point on the resolved config. The training
rules are generated from the stage registry (pipeline/stages/registry.py): a stage's config
section is a rule `params` entry, so changing it reruns that stage and what depends on it; it is
launched as `pipeline/launch.py` says (one process, torchrun, or srun + torchrun) and asks for
`resources.<stage>`, neither of which is a rerun trigger. Building the DAG imports no torch.
"""

import hashlib
import json
import os
import sys
from datetime import datetime, timezone

from snakemake.common.configfile import load_configfile

from pipeline.settings.load import (
    ConfigError,
    not_a_config_file,
    resolve,
    typed_config,
    write_config,
)
from pipeline.launch import (
    attempt_log,
    keep_attempt_logs,
    cluster_threads,
    prepare_params,
    progress_filter,
    rule_resources,
    split_params,
    stage_command,
    stage_params,
    tokenizer_params,
)
from pipeline.data.shards import changed_line, changed_shards
from pipeline.settings import PrepareSettings, TokenizerSettings
from pipeline.stages.prepare import corpus_parts
from pipeline.stages.registry import fine_tuning_stages, training_stages
from pipeline.errors import last_error_line
from pipeline.slurm import killed_for, wait_for_earlier_jobs
from pipeline.tracking import (
    PARENT_RUN_ENV,
    end_parent_run,
    read_warnings,
    start_parent_run,
    warnings_block,
)


configfile: "config.yaml"


report: "report/workflow.rst"


envvars:
    "PATH",


def _as_given(path) -> str:
    """A --configfile path (Snakemake makes them absolute) relative to here when it is below."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


# Snakemake reads every argument after --configfile as one more config file, a target too
# (`--configfile my.yaml results/pretrain/metrics.json`), and merges them all before this file
# runs: each is checked on its own first, so such a file is named, not each of its keys.
for _path in workflow.overwrite_configfiles:
    _problem = not_a_config_file(_as_given(_path), load_configfile(_path))
    if _problem:
        sys.exit(
            f"error: {_problem}\nhint: Snakemake takes every argument after --configfile for a"
            " config file, targets too: put the targets before --configfile (snakemake"
            " results/pretrain/metrics.json --configfile my.yaml), or end the config files"
            " with -- (--configfile my.yaml -- results/pretrain/metrics.json)"
        )

# Every default filled in: the resolved config the jobs read holds every effective value. A bad
# value ends in one `error:` line per problem, not in Snakemake's traceback.
try:
    _resolved = resolve(config, source="config.yaml + --configfile/--config")
except ConfigError as error:
    hint = (
        "\nhint: --config reads a value as a string (`key={a: 1}` as {a: '1'}) and cannot set a"
        " dotted key: put your values in a YAML file and pass it with --configfile"
    )
    sys.exit(f"error: {error}" + (hint if workflow.config_settings.config else ""))
config.clear()
config.update(_resolved)
CONFIG = typed_config(config)  # the same values as the settings classes

PATHS = CONFIG.paths
# This invocation's config, named by its content: two invocations with different configs running
# at once each hand their jobs their own file (a job reads the path from its rule's params). The
# path is a params function of `input`, so not a rerun trigger: a config change reruns only the
# stages whose own section (a plain param) changed. config.resolved.yaml is a copy of the latest.
_DIGEST = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
RESOLVED_CONFIG = str(PATHS.results / "configs" / f"{_DIGEST}.yaml")
LATEST_CONFIG = str(PATHS.results / "config.resolved.yaml")
# Jobs run `python` from the environment that runs Snakemake, whether or not it is activated.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
TRACKING = CONFIG.tracking
TRAINING = training_stages()
STAGES_WITH_METRICS = {name: PATHS.stage(name) / "metrics.json" for name in TRAINING}
STAGE_OF_RULE = {
    "download": "download",
    "tokenizer": "tokenizer",
    "tokenize": "prepare",
    "prepare": "prepare",
    **{stage.rule: name for name, stage in TRAINING.items()},
    "tokenizer_report": "tokenizer",
}


# The files `snakemake --report report.html` shows, by name in a stage's results/<stage>/: each has
# its caption in report/<name without suffix>.rst and a subcategory; the category is the stage.
REPORTED = {
    "metrics.json": "Metrics",
    "loss.png": "Training",
    "confusion_matrix.png": "Evaluation",
    "reliability_diagram.png": "Evaluation",
    "misclassified.tsv": "Evaluation",
    "samples.txt": "Generations",
    "test_responses.json": "Generations",
}


def stage_output(stage: str, name: str):
    """results/<stage>/<name>, marked for the report when it is one of REPORTED and exists:
    `--report` fails on a marked file that is missing, and a report before (or part-way
    through) a run shows what there is. The flag is no rerun trigger."""
    path = str(PATHS.stage(stage) / name)
    if name not in REPORTED or not os.path.exists(path):
        return path
    caption = f"report/{name.rsplit('.', 1)[0]}.rst"
    return report(path, caption=caption, category=stage, subcategory=REPORTED[name])


def stages_of(jobs) -> list[str]:
    """The pipeline stages of Snakemake `jobs`, in DAG order, each once."""
    rules = {job.rule.name for job in jobs}
    return list(dict.fromkeys(s for rule, s in STAGE_OF_RULE.items() if rule in rules))


def finished_metrics() -> dict:
    """The metrics.json of each training stage that THIS invocation ran to the end (Snakemake's
    DAG knows its finished jobs): another invocation's results are not this run's."""
    ran = stages_of(workflow.dag.finished_jobs)
    return {stage: path for stage, path in STAGES_WITH_METRICS.items() if stage in ran}


# The rules whose job writes its stage's warnings (results/<stage>/warnings.json): prepare's
# gather, not its tokenize parts, the training rules and the tokenizer's report.
WARNING_RULES = {
    "prepare": "prepare",
    "tokenizer_report": "tokenizer",
    **{stage.rule: name for name, stage in TRAINING.items()},
}


def finished_warnings() -> dict:
    """The warnings of each stage whose job THIS invocation finished (as `finished_metrics`)."""
    ran = {job.rule.name for job in workflow.dag.finished_jobs}
    return {s: read_warnings(PATHS.stage(s)) for rule, s in WARNING_RULES.items() if rule in ran}


def failed_job_errors() -> list[str]:
    """`<log>: <error line>` of each job that failed in this invocation: without a profile's
    show-failed-logs, Snakemake names only the log, and the reason is its last `error:` line;
    and `<stage>: SLURM job <id> went over its memory/time limit` for one SLURM killed."""
    failed = workflow.scheduler.failed
    errors = [
        f"{log}: {line}" for job in failed for log in job.log if (line := last_error_line(log))
    ]
    killed = [(STAGE_OF_RULE[job.rule.name], killed_for(job.rule.name)) for job in failed]
    return errors + [f"{stage}: {reason}" for stage, reason in killed if reason]


def show_run_end() -> None:
    """The end of the run on the terminal: this invocation's warnings, then its failed jobs'
    errors, whichever way Snakemake was started (`make pipeline`, a profile or none)."""
    lines = [line for line in [warnings_block(finished_warnings()), *failed_job_errors()] if line]
    if lines:
        print("\n".join(lines), file=sys.stderr, flush=True)


def clear_accepted_resume_states() -> None:
    """Delete the resume checkpoint of each training stage whose job THIS invocation finished:
    its jobs keep it (--keep-resume-state) until Snakemake has accepted their outputs, so a
    retry of a job killed after its work resumes at the last step instead of from scratch."""
    # deferred: torch, which building the DAG never imports
    from pipeline.train import clear_resume_state

    for stage in stages_of(workflow.dag.finished_jobs):
        if stage in TRAINING:
            clear_resume_state(PATHS.stage_resume(stage))


onstart:
    if not workflow.executor_plugin.common_settings.local_exec:  # jobs go to SLURM
        wait_for_earlier_jobs(say=lambda line: print(line, file=sys.stderr, flush=True))
    write_config(config, RESOLVED_CONFIG)
    write_config(config, LATEST_CONFIG)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    name = f"{'+'.join(stages_of(workflow.dag.needrun_jobs())) or 'nothing'} {started}"
    os.environ[PARENT_RUN_ENV] = start_parent_run(TRACKING.uri, TRACKING.experiment, name)


onsuccess:
    clear_accepted_resume_states()
    if PARENT_RUN_ENV in os.environ:
        end_parent_run(TRACKING.uri, os.environ[PARENT_RUN_ENV], True, finished_metrics())
    show_run_end()


onerror:
    clear_accepted_resume_states()
    if PARENT_RUN_ENV in os.environ:
        end_parent_run(TRACKING.uri, os.environ[PARENT_RUN_ENV], False, finished_metrics())
    show_run_end()


# On a cluster these run where Snakemake runs: `all` does nothing, and `download` needs the
# internet (or the mirror), which compute nodes often lack.
localrules:
    all,
    download,


TOKENIZER_METRICS = str(PATHS.stage("tokenizer") / "metrics.json")


rule all:
    input:
        [str(path) for path in STAGES_WITH_METRICS.values()],
        TOKENIZER_METRICS,
    default_target: True


# A checkpoint: the tokenize parts are groups of corpus files of about equal size, which is known
# only once the files are downloaded (before, every size would be 0 and the DAG would name the
# wrong files for each part).
checkpoint download:
    output:
        [str(PATHS.source(source.name)) for source in CONFIG.data.sources],
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


scattergather:
    tokenize=config["prepare"]["scatter"],


PREPARE = CONFIG.for_stage("prepare", PrepareSettings)
CORPUS_FILES = [str(f.path) for part in corpus_parts(PREPARE).values() for f in part]


def part_files(wildcards) -> list[str]:
    """The corpus files one tokenize job reads, as its own job computes them: from the files'
    sizes, after the download checkpoint (Snakemake re-evaluates this once it has run)."""
    checkpoints.download.get()
    return [str(f.path) for f in corpus_parts(PREPARE)[wildcards.scatteritem]]


def force_rerun(rule: str) -> None:
    """Run `rule` as `-R rule` does. Snakemake hands the workflow its DAG settings only after
    reading this file, so `rule` joins their `forcerun` as the DAG is built."""
    build_dag = workflow._prepare_dag

    def forced(*args, **kwargs):
        settings = workflow.dag_settings
        settings.forcerun = frozenset(settings.forcerun) | {rule}
        return build_dag(*args, **kwargs)

    workflow._prepare_dag = forced


# A token shard changed since prepare wrote it (not the size or sha256 in meta.json): Snakemake
# checks a rule's inputs, never its outputs' contents, so prepare is forced to rerun (and what
# follows). Only here, not in a cluster job's Snakemake, which reads this file too.
_CHANGED_SHARDS = changed_shards(PATHS.tokens) if workflow.is_main_process else []
if _CHANGED_SHARDS:
    print(changed_line(_CHANGED_SHARDS), file=sys.stderr)
    force_rerun("prepare")


TOKENIZER = CONFIG.section_of("tokenizer", TokenizerSettings)
FINE_TUNING = fine_tuning_stages()


def source_of(stage: str) -> str:
    return str(PATHS.source(CONFIG.sections[stage].data))


def tokenizer_inputs() -> dict:
    """GPT-2's files, or what a trained tokenizer learns from: the corpus and the data of the
    fine-tuning stages that join its sample."""
    if TOKENIZER.kind == "gpt2":
        return {"bpe": [str(path) for path in PATHS.bpe_files]}
    return {
        "corpus": CORPUS_FILES,
        "fine_tuning": [source_of(stage) for stage in TOKENIZER.fine_tuning],
    }


rule tokenizer:
    input:
        **tokenizer_inputs(),
    output:
        directory(str(PATHS.tokenizer)),
        str(PATHS.stage("tokenizer") / "training.json"),
    params:
        tokenizer=tokenizer_params(config),
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/tokenizer.log",
    benchmark:
        "logs/benchmarks/tokenizer.tsv"
    threads: lambda wildcards: stage_threads("tokenizer")
    resources:
        **rule_resources(CONFIG.resources["tokenizer"]),
    shell:
        # rustbpe takes every core unless told
        "RAYON_NUM_THREADS={threads} python -m pipeline tokenizer --config {params.config}"
        " > {log} 2>&1"


rule tokenizer_report:
    input:
        tokens=str(PATHS.tokens),
        tokenizer=str(PATHS.tokenizer),
        bpe=[str(path) for path in PATHS.bpe_files],
        fine_tuning=[source_of(stage) for stage in FINE_TUNING],
    output:
        stage_output("tokenizer", "metrics.json"),
    params:
        splits=split_params(config, FINE_TUNING),
        seed=config["seed"],
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/tokenizer-report.log",
    benchmark:
        "logs/benchmarks/tokenizer-report.tsv"
    threads: 1
    shell:
        "python -m pipeline tokenizer --report --config {params.config} > {log} 2>&1"


rule tokenize:
    input:
        corpus=part_files,
        tokenizer=str(PATHS.tokenizer),
    output:
        temp(directory(str(PATHS.token_parts / "{scatteritem}"))),
    params:
        prepare=prepare_params(config["prepare"]),
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/prepare-{scatteritem}.log",
    benchmark:
        "logs/benchmarks/prepare-{scatteritem}.tsv"
    threads: lambda wildcards: stage_threads("prepare")
    resources:
        **rule_resources(CONFIG.resources["prepare"]),
    shell:
        "python -m pipeline prepare --part {wildcards.scatteritem} --config {params.config}"
        " --threads {threads} > {log} 2>&1"


rule prepare:
    input:
        gather.tokenize(str(PATHS.token_parts / "{scatteritem}")),
    output:
        directory(str(PATHS.tokens)),
    params:
        prepare=prepare_params(config["prepare"]),
        config=lambda wildcards, input: RESOLVED_CONFIG,
    log:
        "logs/prepare.log",
    benchmark:
        "logs/benchmarks/prepare.tsv"
    threads: 1
    resources:
        **rule_resources(CONFIG.resources["prepare"]),
    shell:
        "python -m pipeline prepare --gather --config {params.config} > {log} 2>&1"


def stage_threads(stage: str) -> int:
    """`resources.<stage>.threads`; if null, every core Snakemake was given in a local run, and
    `cluster_threads` on a cluster (--cores there only caps what each job gets)."""
    threads = CONFIG.resources[stage].threads
    if threads is not None:
        return threads
    if workflow.executor_plugin is None:
        return 1  # --dag, --report: no job runs (a rule's threads are evaluated as jobs are made)
    train = CONFIG.sections[stage].train if stage in TRAINING else None
    if not workflow.is_main_process:  # inside a cluster job, whose Snakemake has --cores all
        return int(os.environ.get("SLURM_CPUS_PER_TASK") or cluster_threads(train))
    return cluster_threads(train) if on_cluster() else workflow.cores


def on_cluster() -> bool:
    """Whether jobs go to a cluster executor (SLURM), in a --dry-run too: Snakemake swaps in its
    local dryrun executor then, and shows the intended one only by forcing `use_threads`."""
    settings = workflow.executor_plugin.common_settings
    if settings.dryrun_exec:
        return workflow.execution_settings.use_threads
    return not settings.local_exec


def launch_command(stage: str):
    """The rule's command as a params function of `threads`: Snakemake passes the job's actual
    threads, and a param that takes them is not a rerun trigger (nor is the shell template)."""

    def command(wildcards, threads: int) -> str:
        return stage_command(
            stage,
            CONFIG.sections[stage].train,
            threads,
            RESOLVED_CONFIG,
            gpus_per_node=CONFIG.resources[stage].gpu,
        )

    return command


for stage in TRAINING.values():
    out_dir = PATHS.stage(stage.name)

    rule:
        name:
            stage.rule
        input:
            **stage.inputs(CONFIG),
        output:
            model=directory(str(out_dir / "model")),
            metrics=stage_output(stage.name, "metrics.json"),
            reports=[stage_output(stage.name, name) for name in stage.outputs],
        params:
            section=stage_params(config[stage.name]),
            model=config["model"],
            seed=config["seed"],
            device=config["device"],
            command=launch_command(stage.name),
            # A function (of `input`, so no rerun trigger): the shell directive is run at job
            # time, when the loop's `stage` is the last one.
            progress=lambda wildcards, input, name=stage.name: progress_filter(name),
            keep_logs=lambda wildcards, input, name=stage.name: keep_attempt_logs(
                f"logs/{name}.log", "$attempt"
            ),
            attempt_log=lambda wildcards, input, name=stage.name: attempt_log(
                f"logs/{name}.log", "$attempt"
            ),
        log:
            f"logs/{stage.name}.log",
        benchmark:
            f"logs/benchmarks/{stage.name}.tsv"
        threads: lambda wildcards, name=stage.name: stage_threads(name)
        resources:
            **rule_resources(CONFIG.resources[stage.name], CONFIG.sections[stage.name].train),
            attempt=lambda wildcards, attempt: attempt,  # for the shell's; SLURM ignores it
        shell:
            # The whole output in the log and in logs/attempts/ (Snakemake deletes the log
            # before a retry); the training loop's step lines on the terminal too.
            "attempt={resources.attempt}; {params.keep_logs}; {params.command} 2>&1"
            " | tee {log} {params.attempt_log} | {params.progress} >&2"
