"""Stage `download`: every configured source into data/raw, from a mirror or its URL,
sha256-checked."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.download import download_all
from pipeline.settings import StageConfig
from pipeline.tracking import stage_run


def main(config: StageConfig[None], threads: int | None = None) -> list[Path]:
    mirrors = [Path(m) for m in config.data.mirrors]
    with stage_run(config.tracking, "download", config.resolved) as tracker:
        files = download_all(config.data.sources, config.paths.raw, mirrors)
        tracker.log_params({"files": len(files), "bytes": sum(f.stat().st_size for f in files)})
    return files
