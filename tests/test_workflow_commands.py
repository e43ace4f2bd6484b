"""The README's Snakemake commands as a user types them: `make dag` and `make report` (and that
they fail loudly), `snakemake --dag` and `--report` without `--cores`, a bad `--config` value
ending in an `error:` line instead of Snakemake's traceback, and a run's end showing a failed
job's error line and the stages' warnings. Nothing is trained."""

import json
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from snakemake_runs import copy_workflow, make_workdir, snakemake, tiny_config

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
VENV = Path(sys.executable).parent.parent


@pytest.fixture
def workdir(tmp_path, repo) -> Path:
    return copy_workflow(repo, tmp_path)


def run(workdir: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)


def make(workdir: Path, repo: Path, target: str, *args: str) -> subprocess.CompletedProcess:
    # -o setup: the venv running the tests is already set up.
    return run(
        workdir, "make", "-f", str(repo / "Makefile"), "-o", "setup", target, f"VENV={VENV}", *args
    )


def make_dag(workdir: Path, repo: Path) -> subprocess.CompletedProcess:
    return make(workdir, repo, "dag")


def test_dag_and_report_need_no_cores(workdir):
    dag = run(workdir, SNAKEMAKE, "--dag")
    assert dag.returncode == 0, dag.stderr
    assert dag.stdout.startswith("digraph snakemake_dag {")
    for rule in ("download", "tokenize", "prepare", "pretrain", "finetune_classifier", "align_dpo"):
        assert f'[label = "{rule}' in dag.stdout
    report = run(workdir, SNAKEMAKE, "--report", "report.html")
    assert report.returncode == 0, report.stderr
    assert (workdir / "report.html").read_text().lstrip().lower().startswith("<!doctype html>")


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_make_dag_writes_the_svg(workdir, repo):
    result = make_dag(workdir, repo)
    assert result.returncode == 0, result.stdout + result.stderr
    svg = (workdir / "dag.svg").read_text()
    assert "<svg" in svg and "finetune_instruct" in svg


def test_make_dag_fails_loudly_and_writes_no_svg(workdir, repo):
    (workdir / "config.yaml").write_text(yaml.safe_dump({"seed": "one"}))
    result = make_dag(workdir, repo)
    assert result.returncode != 0
    if shutil.which("dot") is not None:
        assert "error: invalid configuration" in result.stderr and "seed: 'one'" in result.stderr
    assert not (workdir / "dag.svg").exists()


def test_make_report_fails_loudly_and_writes_no_report(workdir, repo):
    (workdir / "config.yaml").write_text(yaml.safe_dump({"seed": "one"}))
    result = make(workdir, repo, "report")
    assert result.returncode != 0
    assert "error: invalid configuration" in result.stderr and "seed: 'one'" in result.stderr
    assert not (workdir / "report.html").exists()
    assert not list(workdir.glob(".report.*"))


def test_a_bad_config_value_ends_in_error_lines_not_a_traceback(workdir):
    result = run(workdir, SNAKEMAKE, "--dry-run", "--config", "pretrain={train: {max_steps: ten}}")
    assert result.returncode == 1
    err = result.stderr
    assert "error: invalid configuration (config.yaml + --configfile/--config):" in err
    assert "  pretrain.train.max_steps: 'ten' is not of type 'integer'" in err
    assert "hint: --config reads a value as a string" in err and "--configfile" in err
    assert "Traceback" not in err and 'File "' not in err


def test_a_bad_configfile_value_gets_no_hint_about_config(workdir):
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"pretrain": {"train": {"max_steps": -1}}}))
    result = run(workdir, SNAKEMAKE, "--dry-run", "--configfile", "bad.yaml")
    assert result.returncode == 1
    assert "  pretrain.train.max_steps: -1 is less than the minimum of 1" in result.stderr
    assert "hint:" not in result.stderr and "Traceback" not in result.stderr


def runtime_closure(distribution: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution a plain `pip install <distribution>` brings (with `extras`): what
    `make pipeline` sets up, without the `dev` extra the tests run with."""
    found: set[str] = set()
    todo = [(distribution, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in found and not wanted:
            continue
        found.add(key)
        try:
            lines = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in lines:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in {"", *wanted}):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return found


@pytest.mark.parametrize(
    ("command", "extras", "distribution"),
    [
        ("make report", frozenset(), "pygments"),  # Snakemake's report renders code with it
        ("make mlflow-server", frozenset({"team"}), "psycopg2-binary"),  # PostgreSQL's driver
    ],
)
def test_runtime_commands_need_nothing_from_the_dev_extra(command, extras, distribution):
    """`make report` right after `make pipeline` on a fresh clone failed: pygments came only
    with the dev extra the tests install. Each README command's set-up must bring what it uses
    (`make mlflow-server` adds the `team` extra)."""
    assert canonicalize_name(distribution) in runtime_closure("gpt-pipeline", extras), command


def test_a_target_after_configfile_is_named_as_no_config_file(workdir):
    """Snakemake reads every argument after --configfile as a config file, a target too."""
    (workdir / "mine.yaml").write_text(yaml.safe_dump({"pretrain": {"train": {"max_steps": 50}}}))
    metrics = workdir / "results" / "pretrain" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({
        "train_loss": 4.97, "val_loss": 5.28, "val_perplexity": 195.7, "val_bpb": 2.46,
        "tokens_per_second": 607.4, "train_time_s": 843.0, "steps": 500, "parameters": 7242624,
        "tokens_seen": 512000, "epochs": 1.68, "init_from": "scratch",
    }, indent=2))  # fmt: skip
    target = "results/pretrain/metrics.json"
    result = run(workdir, SNAKEMAKE, "-n", "--cores", "1", "--configfile", "mine.yaml", target)
    assert result.returncode == 1
    err = result.stderr
    assert f"error: {target}: not a config file (" in err
    assert "targets before --configfile" in err
    assert "unknown key" not in err and "Traceback" not in err
    # a config file whose keys are mostly no settings: named the same way
    (workdir / "profile.yaml").write_text(yaml.safe_dump({"executor": "slurm", "jobs": 8,
                                                          "latency-wait": 60}))  # fmt: skip
    result = run(workdir, SNAKEMAKE, "-n", "--cores", "1", "--configfile", "mine.yaml",
                 "profile.yaml")  # fmt: skip
    assert result.returncode == 1 and "error: profile.yaml: not a config file (" in result.stderr
    # in the right order, the target is built from mine.yaml
    ok = run(workdir, SNAKEMAKE, "-n", "--cores", "1", target, "--configfile", "mine.yaml")
    assert ok.returncode == 0, ok.stderr
    # a typo in a real config file is still an unknown key, not "no config file"
    (workdir / "typo.yaml").write_text(yaml.safe_dump({"pretrian": {"epochs": 1}}))
    typo = run(workdir, SNAKEMAKE, "-n", "--cores", "1", "--configfile", "typo.yaml")
    assert "pretrian: unknown key" in typo.stderr and "not a config file" not in typo.stderr


def corpus_workdir(tmp_path: Path, repo: Path, mirror: Path, files: dict[str, bytes],
                   **prepare) -> Path:  # fmt: skip
    """A workflow copy whose corpus is `files` (in tmp_path/corpus), with `prepare` settings."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)
    config = tiny_config(mirror)
    config["prepare"] = {"corpus": [{"path": str(corpus)}], **prepare}
    return make_workdir(tmp_path / "work", repo, config)


@pytest.mark.parametrize("profile", [[], ["--profile", "profiles/local"]], ids=["plain", "local"])
def test_a_failed_jobs_error_line_is_on_the_terminal(tmp_path, repo, mirror, profile):
    """The README's `snakemake --cores all` (no profile, so no show-failed-logs) showed only
    `log: logs/prepare-1-of-1.log (check log file(s) for error details)`; the reason was in the
    log alone. The run now ends with each failed job's log and its `error:` line."""
    workdir = corpus_workdir(tmp_path, repo, mirror, {"binary.txt": b"caf\xe9 au lait\n"})
    if profile:
        shutil.copytree(repo / "profiles", workdir / "profiles")
    result = snakemake(workdir, *profile, "--", "data/tokens", check=False)
    assert result.returncode != 0
    reason = f"error: {tmp_path / 'corpus' / 'binary.txt'}:1: not UTF-8"
    assert reason in (workdir / "logs" / "prepare-1-of-1.log").read_text()
    shown = [line for line in result.stderr.splitlines() if reason in line]
    assert shown and shown[-1].startswith(f"logs/prepare-1-of-1.log: {reason}"), result.stderr
    assert "prepare.on_bad_record: skip" in shown[-1]


def test_the_run_ends_with_the_warnings_of_the_stages_it_ran(tmp_path, repo, mirror):
    """A warning (collapsed answers, a val split far from its setting) was only in logs/*.log
    and an MLflow tag; the end of the run lists each stage's."""
    big = b"A long book, chapter after chapter. " * 3000  # in train: val far below 10%
    notes = {f"note{i:02d}.txt": f"Short note {i}. ".encode() * 10 for i in range(40)}
    workdir = corpus_workdir(tmp_path, repo, mirror, {"big.txt": big, **notes},
                             val_split="documents")  # fmt: skip
    result = snakemake(workdir, "--", "data/tokens")
    (warning,) = json.loads((workdir / "results" / "prepare" / "warnings.json").read_text())
    assert warning.startswith("val is ") and "prepare.val_split: tail" in warning
    end = result.stderr[result.stderr.rindex("steps (100%) done") :]
    assert f"warnings (1; the logs/ say more):\n  prepare: {warning}\n" in end, result.stderr
