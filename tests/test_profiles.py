"""The Snakemake profiles and what the DAG's rules ask for, read back from Snakemake dry runs
(nothing is trained): the SLURM profile parses and dry-runs with the executor plugin, each
training rule requests the threads, memory, runtime, GPUs and nodes its config says, and
launches through torchrun exactly when it runs several processes."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.launch import progress_filter

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
TRAINING_RULES = ("pretrain", "finetune_classifier", "finetune_instruct", "align_dpo")
SLURM_ENV = {"SBATCH_ACCOUNT": "proj42", "SBATCH_PARTITION": "cpu"}
CONFIG_FILE = r"results/configs/[0-9a-f]{16}\.yaml"  # the invocation's config, by its content
KEEP_LOGS = r"^attempt=1; mkdir .*?; fi; "  # a training job keeps the logs of earlier attempts


def logged(stage: str) -> str:
    """How a training job's command ends: its resume state kept for Snakemake to delete, all
    output to its log, step lines to the terminal."""
    tee = f"tee logs/{stage}.log logs/attempts/{stage}.$attempt.log"
    return f" --keep-resume-state 2>&1 | {tee} | {progress_filter(stage)} >&2"


@pytest.fixture
def workdir(tmp_path, repo) -> Path:
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(repo / name, tmp_path / name)
    shutil.copytree(repo / "profiles", tmp_path / "profiles")
    shutil.copytree(repo / "configs", tmp_path / "configs")
    return tmp_path


def snakemake(workdir: Path, *args: str, config: dict | None = None, env: dict | None = None):
    if config is not None:
        (workdir / "test.yaml").write_text(yaml.safe_dump(config))
        args = (*args, "--configfile", "test.yaml")
    result = subprocess.run(
        [SNAKEMAKE, *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_environ(), **(env or {})},
    )
    assert result.returncode == 0, f"snakemake failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _environ() -> dict:
    """This environment without SLURM_ENV's names, so the profile's `$VAR`s stay unset."""
    return {k: v for k, v in os.environ.items() if k not in SLURM_ENV}


def dry_run_jobs(output: str) -> dict[str, SimpleNamespace]:
    """Each job of a `--dry-run --printshellcmds` listing: threads, resources, shell command."""
    jobs: dict[str, SimpleNamespace] = {}
    job = None
    for line in output.splitlines():
        if match := re.fullmatch(r"(?:local)?(?:rule|checkpoint) (\w+):", line):
            job = jobs[match[1]] = SimpleNamespace(threads=1, resources={}, shell=None)
        elif job is None:
            continue
        elif match := re.fullmatch(r" {4}threads: (\d+)", line):
            job.threads = int(match[1])
        elif line.startswith("    resources: "):
            items = line.removeprefix("    resources: ").split(", ")
            pairs = (item.split("=", 1) for item in items)
            job.resources = {k: int(v) if v.isdigit() else v for k, v in pairs}
        elif line.startswith("Shell command: "):
            shell = re.sub(CONFIG_FILE, "<config>", line.removeprefix("Shell command: "))
            job.shell = re.sub(KEEP_LOGS, "", shell)
    return jobs


def requested(job: SimpleNamespace) -> dict:
    keys = ("mem_mb", "runtime", "gpu", "nodes", "tasks", "gres")
    return {"threads": job.threads, **{k: job.resources[k] for k in keys if k in job.resources}}


def test_profiles_are_yaml_mappings_of_snakemake_options(repo):
    local = yaml.safe_load((repo / "profiles" / "local" / "config.yaml").read_text())
    slurm = yaml.safe_load((repo / "profiles" / "slurm" / "config.yaml").read_text())
    assert local["cores"] == "all" and "executor" not in local
    assert slurm["executor"] == "slurm" and "cores" not in slurm
    assert {"slurm_account", "slurm_partition", "mem_mb", "runtime"} <= set(
        slurm["default-resources"]
    )
    # no per-stage settings: a stage's partition is its config's resources.<stage>.partition
    assert "set-resources" not in slurm
    # squeue works with and without job accounting (sacct hangs without; issue 30)
    assert slurm["slurm-status-command"] == "squeue"
    assert slurm["slurm-init-seconds-before-status-checks"] <= 10
    # Snakemake would apply a profiles/default to every run, the SLURM one included.
    assert not (repo / "profiles" / "default").exists()


def test_slurm_profile_dry_runs_the_whole_dag(workdir):
    jobs = dry_run_jobs(snakemake(workdir, "--profile", "profiles/slurm", "--dry-run"))
    assert set(jobs) == {
        "download", "tokenizer", "tokenize", "prepare", "tokenizer_report", *TRAINING_RULES, "all"
    }  # fmt: skip
    assert jobs["prepare"].resources["slurm_partition"] == "$SBATCH_PARTITION"  # as written


def test_slurm_profile_gives_stages_without_threads_two_per_process(workdir):
    """The default config (no resources.<stage>.threads) and the GPU preset (none for prepare)
    run under the SLURM profile as they are: 2 threads per process, however many --cores (a
    dry run without --cores shows 1 thread for every job; the real run's are tests/cluster's)."""
    config = _training()
    config["pretrain"]["train"] = {"nproc_per_node": 2}
    args = ("--profile", "profiles/slurm", "--cores", "1024", "--dry-run")
    jobs = dry_run_jobs(snakemake(workdir, *args, config=config, env=SLURM_ENV))
    expected = {"tokenizer": 2, "tokenize": 2, "pretrain": 4, "finetune_classifier": 2}
    assert {rule: jobs[rule].threads for rule in expected} == expected
    assert "--threads 2 " in jobs["tokenize"].shell and "--threads 2 " in jobs["pretrain"].shell

    preset = ("--configfile", "configs/gpu-cluster.yaml")
    jobs = dry_run_jobs(snakemake(workdir, *args, *preset, env=SLURM_ENV))
    assert (jobs["tokenize"].threads, jobs["pretrain"].threads) == (2, 32)


def test_slurm_profile_tokenizes_in_scattered_jobs_with_their_resources(workdir):
    config = {
        "prepare": {"scatter": 3},
        "resources": {"prepare": {"threads": 4, "mem_mb": 8000, "runtime": 20}},
    }
    args = ("--profile", "profiles/slurm", "--dry-run", "--cores", "64")
    output = snakemake(workdir, *args, config=config, env=SLURM_ENV)
    blocks = output.split("\n\n")
    tokenize = [b for b in blocks if "rule tokenize:" in b]
    assert len(tokenize) == 3
    for block in tokenize:
        job = dry_run_jobs(block)["tokenize"]
        assert requested(job) == {"threads": 4, "mem_mb": 8000, "runtime": 20, "gpu": 0}
        assert job.resources["slurm_partition"] == "cpu"
        assert "python -m pipeline prepare --part" in job.shell and "--threads 4" in job.shell
    assert len([b for b in blocks if "rule prepare:" in b]) == 1


def sbatch_options(job: SimpleNamespace) -> list[str]:
    """The sbatch options the SLURM plugin makes of a job's resources (its own submit-string
    code, so no sbatch is needed), split into single options."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    class Resources(dict):
        __getattr__ = dict.__getitem__

    plugin_job = SimpleNamespace(resources=Resources(job.resources), threads=job.threads)
    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "",
              "partition": "", "workdir": ""}  # fmt: skip
    sbatch = get_submit_command(plugin_job, params) + set_gres_string(plugin_job)
    return re.sub(r"(-t|--mem) (\d+)", r"\1=\2", sbatch).split()


def test_slurm_profile_maps_the_gpu_preset_to_sbatch(workdir):
    args = ("--profile", "profiles/slurm", "--configfile", "configs/gpu-cluster.yaml")
    jobs = dry_run_jobs(snakemake(workdir, *args, "--cores", "1024", "--dry-run", env=SLURM_ENV))
    assert jobs["prepare"].resources["slurm_partition"] == "cpu"
    for rule in TRAINING_RULES:
        job = jobs[rule]
        assert job.resources["slurm_account"] == "proj42"
        assert job.resources["slurm_partition"] == "gpu"  # the preset's resources.<stage>
        assert job.threads == 32 and job.resources["gpu"] == 4
        assert job.shell.startswith(
            "python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 4 "
            f"-m pipeline {rule.replace('_', '-')} "
        )
        assert job.shell.endswith(f"--threads 8{logged(rule.replace('_', '-'))}")
    pretrain = jobs["pretrain"]
    assert requested(pretrain) == {"threads": 32, "mem_mb": 128000, "runtime": 240, "gpu": 4}
    options = sbatch_options(pretrain)
    assert {"--mem=128000", "-t=240", "--cpus-per-task=32", "--gpus=4"} <= set(options)
    assert not any(o.startswith(("--nodes", "--gres")) for o in options)


def _training(**train) -> dict:
    return {rule.replace("_", "-"): {"train": dict(train)} for rule in TRAINING_RULES}


def test_default_config_requests_its_resources_and_runs_one_process(workdir):
    jobs = dry_run_jobs(snakemake(workdir, "--cores", "2", "--dry-run", "-p"))
    assert requested(jobs["pretrain"]) == {"threads": 2, "mem_mb": 4000, "runtime": 60, "gpu": 0}
    for rule in TRAINING_RULES[1:]:
        assert requested(jobs[rule]) == {"threads": 2, "mem_mb": 4000, "runtime": 30, "gpu": 0}
    for rule in TRAINING_RULES:
        stage = rule.replace("_", "-")
        assert jobs[rule].shell == (
            f"python -m pipeline {stage} --config <config> --threads 2{logged(stage)}"
        )


def test_processes_gpus_and_nodes_reach_the_rules(workdir):
    config = _training()
    config["pretrain"]["train"] = {"nproc_per_node": 2}
    config["finetune-instruct"]["train"] = {"nproc_per_node": 2, "nnodes": 2}
    config["resources"] = {
        "pretrain": {"threads": 6, "mem_mb": 8000, "runtime": 90, "gpu": 2},
        "finetune-instruct": {"threads": 4, "mem_mb": 16000, "runtime": 45, "gpu": 2},
    }
    jobs = dry_run_jobs(snakemake(workdir, "--cores", "8", "--dry-run", "-p", config=config))

    assert requested(jobs["pretrain"]) == {"threads": 6, "mem_mb": 8000, "runtime": 90, "gpu": 2}
    assert jobs["pretrain"].shell.startswith(
        "python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2 "
        "-m pipeline pretrain --config <config> --threads 3 "
    )
    instruct = jobs["finetune_instruct"]
    assert requested(instruct) == {
        "threads": 4, "mem_mb": 16000, "runtime": 45, "nodes": 2, "tasks": 2, "gres": "gpu:2"
    }  # fmt: skip
    assert instruct.resources["mpi"] == "srun"
    options = sbatch_options(instruct)
    assert {"--nodes=2", "--ntasks=2", "--gres=gpu:2", "--cpus-per-task=4"} <= set(options)
    assert not any(o.startswith(("--gpus", "--ntasks-per-gpu")) for o in options)
    assert instruct.shell.startswith("srun --nodes 2 --ntasks 2 --ntasks-per-node 1 ")
    assert "--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d" in instruct.shell
    logged_to = "--threads 2 --keep-resume-state 2>&1 | tee logs/finetune-instruct.log "
    assert logged_to in instruct.shell
    for rule in ("finetune_classifier", "align_dpo"):  # untouched: one process, all 8 cores
        assert jobs[rule].shell.startswith(f"python -m pipeline {rule.replace('_', '-')} ")
        assert "--threads 8 " in jobs[rule].shell and jobs[rule].threads == 8


def test_launch_keys_and_resources_rerun_nothing_but_a_training_key_does(workdir):
    """Record every job as run (`--touch` writes the metadata, stand-ins the outputs, in the
    order the jobs ran), then change settings."""
    listing = snakemake(workdir, "--cores", "2", "--touch")
    for outputs in re.findall(r"^ {4}output: (.+)$", listing, flags=re.MULTILINE):
        for name in outputs.split(", "):
            path = workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir() if path.name == "model" else path.touch()

    launch = _training(nproc_per_node=2, parallelism="fsdp")
    launch["resources"] = {"pretrain": {"mem_mb": 9000, "runtime": 5, "threads": 2}}
    assert "Nothing to be done" in snakemake(workdir, "--cores", "2", "--dry-run", config=launch)

    changed = {"pretrain": {"train": {"lr": 2.0e-3}}}
    jobs = dry_run_jobs(snakemake(workdir, "--cores", "2", "--dry-run", config=changed))
    assert {"pretrain", "finetune_classifier", "finetune_instruct", "align_dpo"} <= set(jobs)
    assert "prepare" not in jobs
