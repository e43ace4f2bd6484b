"""A real one-node SLURM for the cluster tests: the one that already answers, or one that
slurm_up.sh starts (as root, its packages installed) and stops again at the end of the session.
A test that needs SLURM takes the `slurm_cluster` fixture and skips, saying why, where there is
none; its sbatch jobs and Snakemake runs take `slurm_cluster.env()`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from slurm_node import SlurmCluster, cannot_start, cluster_answers, default_partition, slurm_up


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
