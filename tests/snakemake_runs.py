"""Running the real Snakefile in tests: a tiny config (every stage, seconds of training) in a
work directory, and Snakemake on it with 2 cores."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def tiny_config(mirror: Path, **train) -> dict:
    return {
        "data": {"mirrors": [str(mirror)]},
        "prepare": {"corpus": ["the-verdict.txt"]},
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "context_length": 32},
        "pretrain": {
            "sample_tokens": 8,
            "peak_flops": 1.0e11,
            "train": {
                "max_steps": 6,
                "batch_size": 4,
                "eval_every": 3,
                "eval_batches": 2,
                "checkpoint_every": 2,
                "log_every": 1,
                "warmup_steps": 1,
                **train,
            },
        },
        "finetune-classifier": {
            "epochs": 1,
            "trainable_blocks": 1,
            "train": {
                "max_steps": 4,
                "warmup_steps": 1,
                "batch_size": 4,
                "eval_batches": 2,
                "log_every": 1,
            },
        },
        "finetune-instruct": {
            "epochs": 1,
            "method": "lora",
            "lora": {"rank": 2, "alpha": 4},
            "generation": {"max_new_tokens": 3},
            "train": {
                "max_steps": 3,
                "warmup_steps": 1,
                "batch_size": 4,
                "eval_batches": 2,
                "log_every": 1,
            },
        },
        "align-dpo": {
            "generation": {"max_new_tokens": 2},
            "train": {
                "max_steps": 2,
                "warmup_steps": 1,
                "batch_size": 4,
                "eval_batches": 1,
                "log_every": 1,
            },
        },
    }


def copy_workflow(repo: Path, path: Path) -> Path:
    """The Snakefile, its config.yaml and its report captions (report/) into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(repo / name, path / name)
    shutil.copytree(repo / "report", path / "report", dirs_exist_ok=True)
    return path


def make_workdir(path: Path, repo: Path, config: dict) -> Path:
    copy_workflow(repo, path)
    (path / "tiny.yaml").write_text(yaml.safe_dump(config))
    return path


def snakemake(workdir: Path, *args: str, configfiles=("tiny.yaml",), check: bool = True):
    cmd = [SNAKEMAKE, "--cores", "2", "--configfile", *configfiles, *args]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()}" for p in (workdir / "logs").glob("*.log"))
        raise AssertionError(f"snakemake failed:\n{result.stdout}\n{result.stderr}{logs}")
    return result
