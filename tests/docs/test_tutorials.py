"""Every tutorial's shell commands, run as a user runs them: the page's ```bash blocks in order,
in one `bash -euo pipefail` script, in a fresh copy of the working tree beside the data mirror
(as a clone sits beside ../shared/data). The pages themselves pass the quick preset
(`--configfile configs/quick.yaml`), so what runs here is what the page says, nothing added.
A block the suite cannot run carries `<!-- test: skip (why) -->` just above it: it is left out
and the reason printed."""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TUTORIALS = REPO / "docs" / "tutorials"
PAGES = sorted(TUTORIALS.glob("*.md"))
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*test:\s*skip\s*\((.+)\)\s*-->$")
# Older than any set-up stamp in .venv (`make`'s), so `make pipeline` in the copy finds the
# venv set up, as after `make setup` in a clone, and never reinstalls into the shared venv.
FILES_DATE = 946684800  # 2000-01-01


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    skip: str | None  # the reason, when the page says the suite cannot run it


def bash_blocks(page: Path) -> list[Block]:
    """The page's ```bash blocks, each with the skip reason of the comment just above it."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) == "bash":
            above = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
            skip = SKIP.match(above)
            blocks.append(Block(i + 1, "\n".join(lines[i + 1 : end]), skip and skip.group(1)))
        i = end + 1
    return blocks


def fresh_copy(dest: Path) -> Path:
    """The working tree's files (tracked, and untracked ones git does not ignore) under
    dest/gpt-pipeline, with the project's .venv linked and its built extension copied (both
    ignored by git, so a clone has them after `make setup`), and dest/shared the data mirror."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    work = dest / "gpt-pipeline"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    for so in (REPO / "pipeline" / "kernels").glob("_C*.so"):
        shutil.copy2(so, work / "pipeline" / "kernels" / so.name)
    for path in work.rglob("*"):
        os.utime(path, (FILES_DATE, FILES_DATE))
    (work / ".venv").symlink_to(REPO / ".venv")
    (dest / "shared").symlink_to(REPO.parent / "shared")
    return work


def stop_group(pgid: int) -> None:
    """The script's process group: bash and whatever it started in the background."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)


def script(blocks: list[Block]) -> str:
    """One script of the runnable blocks, each announced on stderr so a failure names it."""
    parts = [f"echo '>>> block at line {b.line}' >&2\n{b.code}" for b in blocks if not b.skip]
    return "\n".join(parts) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_tutorial_runs(page: Path, tmp_path: Path) -> None:
    if not (REPO.parent / "shared" / "data" / "the-verdict.txt").is_file():
        pytest.skip(f"data mirror not found at {REPO.parent / 'shared' / 'data'}")
    if not (REPO / ".venv" / ".ext-built").is_file():
        pytest.skip("no .venv set up by `make setup` to lend the copy (the pages run `make`)")
    blocks = bash_blocks(page)
    assert blocks, f"{page.name}: no ```bash block to run"
    for b in blocks:
        if b.skip:
            print(f"{page.name}:{b.line}: skipped: {b.skip}")
    work = fresh_copy(tmp_path)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if Path(p) != Path(sys.executable).parent
    )
    # a file, not a pipe: a server the page leaves in the background would hold a pipe open
    log = tmp_path / "output.log"
    with log.open("w") as out_file:
        proc = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script(blocks)],
            cwd=work, env=env, stdout=out_file, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            proc.wait(timeout=1200)  # a page runs the quick DAG at most twice
        finally:  # what the page left running in the background (a server it started)
            stop_group(proc.pid)
    out = log.read_text()
    failed = [ln for ln in out.splitlines() if ln.startswith(">>> block at line")]
    where = failed[-1].removeprefix(">>> ") if failed else "set-up before the first block"
    assert proc.returncode == 0, f"{page.name}: the {where} failed:\n{out[-6000:]}"


def commands(block: Block) -> list[str]:
    """The block's command lines, continuation lines joined."""
    return [c.strip() for c in block.code.replace("\\\n", " ").splitlines() if c.strip()]


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_every_run_the_suite_makes_is_quick(page: Path) -> None:
    """A page's Snakemake runs carry the quick preset (a dry run may show any config): the
    default config would train for minutes in the suite."""
    runs = [
        (b.line, c)
        for b in bash_blocks(page)
        if not b.skip
        for c in commands(b)
        if re.search(r"\bsnakemake\b|\bmake (pipeline|report)\b", c)
        and not re.search(r"--dry-run|\s-n\b|--unlock", c)
    ]
    slow = [f"{page.name}:{line}: {c}" for line, c in runs if "configs/quick.yaml" not in c]
    assert not slow, "runs without configs/quick.yaml:\n" + "\n".join(slow)


def test_blocks_are_found_and_skips_say_why(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```bash\necho one\n```\n```text\nnot run\n```\n"
        "<!-- test: skip (needs a GPU) -->\n\n```bash\nnvidia-smi\n```\n"
    )
    assert bash_blocks(page) == [Block(2, "echo one", None), Block(10, "nvidia-smi", "needs a GPU")]
