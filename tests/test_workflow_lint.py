"""`make lint`'s Snakemake part (pipeline/workflow_lint.py): the conda/container advisory is
accepted, every other finding fails, and the repository's own tree is clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.workflow_lint import ACCEPTED, findings, main

VENV = Path(sys.executable).parent.parent
SAMPLE = """Lints for rule download (line 73, /x/Snakefile):
    * Specify a conda environment or container for each rule.:
      This way, the used software for each specific step is documented, and the

Lints for rule x (line 9, /x/Snakefile):
    * Absolute path "/abs" in line 9:
      Do not define absolute paths inside of the workflow, since this
"""


def test_findings_are_the_titles_of_snakemakes_text_lint_output():
    assert findings(SAMPLE) == [next(iter(ACCEPTED)), 'Absolute path "/abs" in line 9']
    assert findings("Congratulations, your workflow is in a good condition!\n") == []


@pytest.fixture
def workdir(tmp_path, repo, monkeypatch) -> Path:
    for name in ("Snakefile", "config.yaml"):
        shutil.copy(repo / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_pipelines_snakefile_passes_with_only_the_accepted_advisory(workdir, capsys):
    assert main([]) == 0
    assert "clean (9 accepted conda/container advisories)" in capsys.readouterr().out


def test_any_other_finding_fails_and_is_named(workdir, capsys):
    with (workdir / "Snakefile").open("a") as snakefile:
        snakefile.write('\nrule extra:\n    output: "/tmp/x"\n    shell: "touch {output}"\n')
    assert main([]) == 1
    err = capsys.readouterr().err
    assert "error: 2 snakemake --lint finding(s):" in err
    assert 'Absolute path "/tmp/x"' in err and "No log directive defined" in err


def test_a_snakefile_that_does_not_load_fails(workdir, capsys):
    (workdir / "config.yaml").write_text("seed: [\n")
    assert main([]) == 1
    assert "error: snakemake --lint failed" in capsys.readouterr().err


def test_make_lint_exits_0_on_the_clean_tree(repo):
    # -o setup -o setup-dev: the venv running the tests is already set up. Its stamps may be
    # older than the tree (which would rebuild the extension) or missing where it was set up
    # without make (which would install the pinned torch into it, over the one it runs).
    result = subprocess.run(
        ["make", "-C", str(repo), "-o", "setup", "-o", "setup-dev", "lint", f"VENV={VENV}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "snakemake --lint: clean" in result.stdout
