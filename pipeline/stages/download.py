"""Stage `download`: every configured source into data/raw, from a mirror or its URL,
sha256-checked."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.data.download import download_all
from pipeline.paths import Paths
from pipeline.tracking import stage_run


def main(config: Mapping[str, Any], threads: int | None = None) -> list[Path]:
    paths = Paths.from_config(config)
    mirrors = [Path(m) for m in config["data"]["mirrors"]]
    with stage_run(config, "download") as tracker:
        files = download_all(config["data"]["sources"], paths.raw, mirrors)
        tracker.log_metrics(
            {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}, step=0
        )
    return files
