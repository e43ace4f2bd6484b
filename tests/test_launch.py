"""How a training stage is launched and what its rule requests (pipeline/launch.py), and the
config checks that keep batch size, processes, GPUs and threads consistent."""

import dataclasses
import subprocess

import pytest

from pipeline.launch import (
    LAUNCH_KEYS,
    attempt_log,
    cluster_threads,
    keep_attempt_logs,
    progress_filter,
    rule_resources,
    stage_command,
    stage_params,
    threads_per_process,
)
from pipeline.settings import StageResources, TrainSettings
from pipeline.settings.load import ConfigError, load_config, typed_config, validate

CONFIG = "results/config.resolved.yaml"
GPU_NODE = StageResources(threads=32, mem_mb=128000, runtime=240, gpu=4)


def test_one_process_runs_the_entry_point_with_every_thread():
    command = stage_command("pretrain", TrainSettings(batch_size=16), 8, CONFIG)
    assert (
        command == "python -m pipeline pretrain --config results/config.resolved.yaml --threads 8"
        " --keep-resume-state"
    )


def test_several_processes_on_one_node_share_the_threads_under_torchrun():
    train = TrainSettings(batch_size=16, nproc_per_node=4)
    assert stage_command("align-dpo", train, 32, CONFIG) == (
        "python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 4 "
        "-m pipeline align-dpo --config results/config.resolved.yaml --threads 8"
        " --keep-resume-state"
    )


@pytest.mark.parametrize(("threads", "nproc", "expected"), [(8, 1, 8), (8, 3, 2), (2, 4, 1)])
def test_threads_per_process_is_the_share_and_at_least_one(threads, nproc, expected):
    assert threads_per_process(threads, TrainSettings(nproc_per_node=nproc)) == expected


def test_several_nodes_start_one_torchrun_per_node_with_srun():
    train = TrainSettings(batch_size=64, nproc_per_node=4, nnodes=2)
    command = stage_command("pretrain", train, 32, CONFIG, gpus_per_node=4)
    assert command == (
        "srun --nodes 2 --ntasks 2 --ntasks-per-node 1 --cpus-per-task 32 --gpus-per-node 4 "
        "--kill-on-bad-exit=1 python -m torch.distributed.run --nnodes 2 --nproc-per-node 4 "
        "--rdzv-backend c10d --rdzv-endpoint $(hostname):29500 --rdzv-id $SLURM_JOB_ID "
        "-m pipeline pretrain --config results/config.resolved.yaml --threads 8"
        " --keep-resume-state"
    )
    assert train.world_size == 8


def test_a_cluster_job_gets_two_threads_per_process_when_its_stage_names_none():
    assert cluster_threads() == 2
    assert cluster_threads(TrainSettings(batch_size=16, nproc_per_node=4)) == 8


def test_every_attempt_of_a_retried_job_keeps_its_log(tmp_path):
    """What a training job runs before and during each attempt, in a real bash: attempt 1
    clears an earlier run's attempts; each writes logs/attempts/<stage>.<N>.log beside the log
    Snakemake deletes before a retry."""
    logs = tmp_path / "logs"
    (logs / "attempts").mkdir(parents=True)
    (logs / "attempts" / "pretrain.2.log").write_text("an earlier run's attempt 2")

    def attempt(number: int) -> None:
        (logs / "pretrain.log").unlink(missing_ok=True)  # as Snakemake does
        log = "logs/pretrain.log"
        script = (
            f"attempt={number}; {keep_attempt_logs(log, '$attempt')}; "
            f"echo attempt $attempt | tee {log} {attempt_log(log, '$attempt')}"
        )
        subprocess.run(["bash", "-c", script], cwd=tmp_path, check=True, capture_output=True)

    for number in (1, 2, 3):
        attempt(number)
    kept = {p.name: p.read_text() for p in sorted((logs / "attempts").iterdir())}
    assert kept == {f"pretrain.{n}.log": f"attempt {n}\n" for n in (1, 2, 3)}
    assert (logs / "pretrain.log").read_text() == "attempt 3\n"
    attempt(1)  # a new run
    assert sorted(p.name for p in (logs / "attempts").iterdir()) == ["pretrain.1.log"]


def test_a_config_path_with_spaces_is_quoted():
    command = stage_command("pretrain", TrainSettings(), 1, "my results/c.yaml")
    assert "--config 'my results/c.yaml' " in command


def test_stage_params_drop_the_launch_keys_and_sort_the_rest():
    section = {"train": {"lr": 1.0, "nproc_per_node": 4, "nnodes": 2, "parallelism": "fsdp"}}
    section["epochs"] = 2
    assert stage_params(section) == {"epochs": 2, "train": {"lr": 1.0}}
    assert list(stage_params(section)) == ["epochs", "train"]
    assert set(section["train"]) >= set(LAUNCH_KEYS)  # the config itself is left alone


def at_attempt(resources: dict, attempt: int = 1) -> dict:
    """Snakemake's view of `resources` at `attempt` (callables called as it calls them)."""
    return {k: v(None, attempt) if callable(v) else v for k, v in resources.items()}


def test_a_resubmitted_job_asks_for_more_memory_and_time():
    resources = rule_resources(GPU_NODE, TrainSettings(nproc_per_node=4))
    assert at_attempt(resources, 2) == {"mem_mb": 256000, "runtime": 480, "gpu": 4}
    assert at_attempt(resources, 3)["mem_mb"] == 384000


def test_one_node_asks_for_gpus_several_nodes_for_a_gres_per_node():
    assert at_attempt(rule_resources(GPU_NODE, TrainSettings(nproc_per_node=4))) == {
        "mem_mb": 128000,
        "runtime": 240,
        "gpu": 4,
    }
    assert at_attempt(rule_resources(GPU_NODE, TrainSettings(nproc_per_node=4, nnodes=2))) == {
        "mem_mb": 128000,
        "runtime": 240,
        "nodes": 2,
        "tasks": 2,
        "mpi": "srun",
        "gres": "gpu:4",
        "tasks_per_gpu": 0,
    }
    cpu_nodes = rule_resources(dataclasses.replace(GPU_NODE, gpu=0), TrainSettings(nnodes=2))
    assert "gres" not in cpu_nodes and "gpu" not in cpu_nodes and cpu_nodes["nodes"] == 2


def _with(default_config: dict, section: str, train: dict, resources: dict | None = None) -> dict:
    config = {**default_config, section: {**default_config[section]}}
    config[section]["train"] = {**config[section]["train"], **train}
    config["resources"] = {**config["resources"]}
    config["resources"][section] = {**config["resources"][section], **(resources or {})}
    return config


def test_the_default_config_launches_one_process_per_stage(default_config):
    config = typed_config(default_config)
    for section in ("pretrain", "finetune-classifier", "finetune-instruct", "align-dpo"):
        assert config.sections[section].train.world_size == 1
        assert config.resources[section].gpu == 0


def test_batch_size_must_divide_among_the_processes(default_config):
    config = _with(default_config, "finetune-instruct", {"batch_size": 6, "nproc_per_node": 4})
    with pytest.raises(ConfigError, match=r"finetune-instruct\.train\.batch_size: 6 is not "
                       r"divisible by the world size 4"):  # fmt: skip
        validate(config)
    validate(_with(default_config, "finetune-instruct", {"batch_size": 8, "nproc_per_node": 4}))
    two_nodes = _with(default_config, "pretrain", {"batch_size": 16, "nproc_per_node": 4})
    two_nodes["pretrain"]["train"]["nnodes"] = 3
    with pytest.raises(ConfigError, match=r"world size 12 \(nproc_per_node 4 x nnodes 3\)"):
        validate(two_nodes)


def test_gpus_per_node_must_match_the_processes(default_config):
    config = _with(default_config, "pretrain", {"nproc_per_node": 2}, {"gpu": 4})
    with pytest.raises(ConfigError, match=r"resources\.pretrain\.gpu: 4 GPUs per node but "
                       r"pretrain\.train\.nproc_per_node is 2"):  # fmt: skip
        validate(config)
    validate(_with(default_config, "pretrain", {"nproc_per_node": 2}, {"gpu": 2}))
    validate(_with(default_config, "pretrain", {"nproc_per_node": 2}, {"gpu": 0}))  # CPU, gloo


def test_threads_must_cover_the_processes(default_config):
    config = _with(default_config, "align-dpo", {"nproc_per_node": 4}, {"threads": 2})
    with pytest.raises(ConfigError, match=r"resources\.align-dpo\.threads: 2 is fewer than"):
        validate(config)


def test_launch_keys_and_resources_are_checked_by_the_schema(repo):
    with pytest.raises(ConfigError, match=r"pretrain\.train\.parallelism: 'zero3' is not one of"):
        load_config([repo / "config.yaml"], ["pretrain.train.parallelism=zero3"])
    with pytest.raises(ConfigError, match=r"align-dpo\.train\.nnodes: 0 is less than"):
        load_config([repo / "config.yaml"], ["align-dpo.train.nnodes=0"])
    with pytest.raises(ConfigError, match=r"resources\.pretrain\.gpus: unknown key"):
        load_config([repo / "config.yaml"], ["resources.pretrain.gpus=1"])
    with pytest.raises(ConfigError, match=r"resources\.download: unknown key; expected one of: al"):
        load_config([repo / "config.yaml"], ["resources.download.gpu=1"])


def test_gpu_cluster_preset_merged_over_the_defaults_is_valid(repo):
    config = load_config([repo / "config.yaml", repo / "configs" / "gpu-cluster.yaml"])
    assert config["device"] == "cuda" and config["model"]["attention"] == "auto"
    for section in ("pretrain", "finetune-classifier", "finetune-instruct", "align-dpo"):
        train, resources = config[section]["train"], config["resources"][section]
        assert train["precision"] == "bf16"
        assert train["nproc_per_node"] == resources["gpu"] == 4
        assert resources["threads"] >= train["nproc_per_node"]


def test_progress_filter_passes_on_only_the_training_step_lines_with_the_stage():
    from pipeline.train.loop import _format_train_line

    entry = {"step": 40, "loss": 3.25, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_second": 1234.0}
    line = _format_train_line({**entry, "train_time_s": 20.0}, 300)  # 0.5 s a step, 260 left
    log = (
        f"2026-01-01 10:00:00,000 INFO pipeline.train: {line}\n"
        "2026-01-01 10:00:01,000 INFO pipeline.train: step 40/300 | eval | val_loss 3.1\n"
        "2026-01-01 10:00:02,000 INFO pipeline.train: sample at step 40:\n"
        "step 1 of a story\n"
        "2026-01-01 10:00:03,000 INFO pipeline.stages: wrote results/pretrain/metrics.json\n"
    )
    shown = subprocess.run(
        progress_filter("pretrain"), shell=True, input=log, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == (
        "pretrain: step 40/300 | loss 3.2500 | lr 1.0e-03 | grad_norm 0.500 | 1,234 tok/s"
        " | eta 2m10s\n"
        "pretrain: step 40/300 | eval | val_loss 3.1\n"
    )
