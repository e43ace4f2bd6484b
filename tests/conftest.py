"""Shared fixtures: the repository root and the read-only data mirror beside it."""

import importlib.util
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = (REPO.parent / "shared" / "data").resolve()
SIDE_WORKER_TESTS = ("tests/cluster/", "tests/docs/test_tutorials.py")


# Defined only where xdist is installed (the dev extra): pytest refuses a hook it does not know.
if importlib.util.find_spec("xdist") is not None:

    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        """`make test` runs `pytest -n 2`: tests/cluster, which mostly waits on SLURM's jobs and
        status checks, and the tutorials' runs (each in a copy of its own) in one worker, and the
        rest of the suite, in its usual order, in the other. (xdist's own `--dist loadgroup` marks
        do not work under pytest 9.2: it renames node ids through an attribute pytest no longer
        reads.)"""
        # deferred: xdist is imported only when it runs the suite
        from xdist.scheduler import LoadScopeScheduling

        class SideWorker(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return "side" if nodeid.startswith(SIDE_WORKER_TESTS) else "main"

        return SideWorker(config, log)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "the-verdict.txt").is_file():
        pytest.skip(f"data mirror not found at {MIRROR}")
    return MIRROR


@pytest.fixture(scope="session")
def default_config() -> dict:
    from pipeline.settings.load import load_config

    return load_config([REPO / "config.yaml"])


@pytest.fixture(scope="session")
def sources(default_config) -> dict:
    """The default `data.sources`, typed, by name."""
    from pipeline.settings.load import typed_config

    return {s.name: s for s in typed_config(default_config).data.sources}
