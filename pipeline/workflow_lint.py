"""`snakemake --lint` for `make lint`: every finding fails it, except the one advisory this
project accepts, so a clean tree exits 0 and a new finding is not lost among known ones.

Accepted: "Specify a conda environment or container for each rule." No conda channel or
container registry is reachable where this pipeline is developed and tested, so an environment
file or image written for it could never be built or run here; the one environment every rule
runs in is the venv `make setup` builds (pyproject.toml + constraints.txt). (`--lint json` would
be easier to read, but Snakemake 9.27 ignores the format and prints text.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ACCEPTED = frozenset({"Specify a conda environment or container for each rule."})
_FINDING = "    * "  # how Snakemake's text lint output starts each finding's title line


def findings(output: str) -> list[str]:
    """The title of each finding in `snakemake --lint` text output."""
    return [
        line.removeprefix(_FINDING).removesuffix(":")
        for line in output.splitlines()
        if line.startswith(_FINDING)
    ]


def main(argv: list[str]) -> int:
    """Run `snakemake --lint` (extra arguments passed on); print what fails, return the exit
    code: 0 when every finding is accepted."""
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    result = subprocess.run([snakemake, "--lint", *argv], capture_output=True, text=True)
    output = result.stdout + result.stderr
    found = findings(output)
    if result.returncode != 0 and not found:
        sys.stderr.write(output)
        print(f"error: snakemake --lint failed (exit code {result.returncode})", file=sys.stderr)
        return 1
    rejected = [title for title in found if title not in ACCEPTED]
    if rejected:
        sys.stderr.write(output)
        print(f"error: {len(rejected)} snakemake --lint finding(s):", file=sys.stderr)
        for title in dict.fromkeys(rejected):
            print(f"  {title}", file=sys.stderr)
        return 1
    accepted = len(found)
    print(f"snakemake --lint: clean ({accepted} accepted conda/container advisories)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
