"""docs/screenshots.py's cheap path: pointed at a directory without a finished run, it stops
with one line naming the missing file (the shots themselves need a run and Chromium: minutes)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_workdir_without_a_run_is_named(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "docs" / "screenshots.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path.resolve() / 'mlflow.db'}: not found; run the pipeline tutorial's "
        "steps 1 and 3 there first"
    )
