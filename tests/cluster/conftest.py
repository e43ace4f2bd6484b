"""A real SLURM for the cluster tests: the one that already answers, or one that slurm_up.sh
starts (as root, its packages installed) and stops again at the end of the session; one node, or
several on this host for a test that calls `slurm_cluster.nodes(n)` (and switches back).
A test that needs SLURM takes the `slurm_cluster` fixture and skips, saying why, where there is
none; its sbatch jobs and Snakemake runs take `slurm_cluster.env()`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_node import SlurmCluster, cannot_start, cluster_answers, default_partition, slurm_up
from slurm_runs import cluster_config
from snakemake_runs import make_workdir, snakemake


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    started = False
    if not cluster_answers():
        reason = cannot_start()
        if reason is not None:
            pytest.skip(reason)
        slurm_up("up")
        started = True
    try:
        yield SlurmCluster(partition=default_partition())
    finally:
        if started:
            slurm_up("down")


@pytest.fixture(scope="session")
def local_run(tmp_path_factory, repo, mirror) -> Path:
    """The cluster tests' config run locally (`--cores 2`) up to pretraining: the reference
    their SLURM runs end as."""
    workdir = make_workdir(tmp_path_factory.mktemp("local"), repo, cluster_config(mirror))
    snakemake(workdir, "--", "results/pretrain/metrics.json")
    return workdir
