"""Shared fixtures: the repository root and the read-only data mirror beside it."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = (REPO.parent / "shared" / "data").resolve()


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
