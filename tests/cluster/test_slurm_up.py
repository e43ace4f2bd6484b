"""slurm_up.sh on this machine: a real SLURM that runs sbatch jobs with the resources they ask
for, with and without job accounting, on one node or on two on this host, and whose `down` stops
only its own daemons. Every test leaves the cluster up, on one node, without accounting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_node import RUN, SCRIPT, SlurmCluster, command, ours, running, slurm_up

pytestmark = pytest.mark.slurm

PID_FILES = {
    "munged": RUN / "munge" / "munged.pid",
    "slurmctld": RUN / "slurmctld.pid",
    "slurmd": RUN / "slurmd.pid",
    "slurmdbd": RUN / "slurmdbd.pid",
    "mariadbd": RUN / "mysql" / "mariadbd.pid",
}
SYSTEM_MUNGE_PID = Path("/run/munge/munged.pid")  # where a munged started by anyone else writes
JOB_WAIT_S = 60
# each rank of a 2-node torchrun job: one gloo all_reduce across the nodes
ALL_REDUCE = """
import os
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
rank, world, node = dist.get_rank(), dist.get_world_size(), os.environ["SLURMD_NODENAME"]
print("all_reduce", rank, world, node, int(total.item()))
dist.destroy_process_group()
"""


@pytest.fixture
def own_cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    """A cluster slurm_up.sh runs, without accounting."""
    if os.geteuid() != 0 or not ours():
        pytest.skip("these tests restart the cluster: only as root on slurm_up.sh's cluster")
    slurm_cluster.accounting(False)
    return slurm_cluster


def daemon_pids() -> dict[str, int]:
    return {
        name: int(path.read_text())
        for name, path in PID_FILES.items()
        if path.is_file() and running(int(path.read_text()))
    }


def submit(cluster: SlurmCluster, output: Path) -> str:
    """An sbatch job asking for 2 CPUs, 500 MB and 1 minute; returns its id."""
    result = command(
        "sbatch", "--parsable", "--cpus-per-task", "2", "--mem", "500", "--time", "1",
        "--account", cluster.account(), "--partition", cluster.partition,
        "--output", str(output), "--wrap", "echo cpus=$SLURM_CPUS_PER_TASK",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def finished_job(job: str) -> dict[str, str]:
    """`scontrol show job`'s fields once the job left the queue's active states."""
    deadline = time.monotonic() + JOB_WAIT_S
    while True:
        shown = command("scontrol", "show", "job", job).stdout
        fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
        if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return fields
        assert time.monotonic() < deadline, f"job {job} not finished after {JOB_WAIT_S} s:\n{shown}"
        time.sleep(0.2)


def accounted_job(job: str) -> str:
    """sacct's line for the finished job, once slurmdbd has all of it: its end can come first,
    with the requested resources and time limit still empty."""
    deadline = time.monotonic() + JOB_WAIT_S
    while True:
        line = command(
            "sacct", "-X", "-n", "--parsable2", "-j", job,
            "--format=JobIdRaw,State,AllocCPUS,ReqMem,Timelimit,Account,ReqTRES",
        ).stdout.strip()  # fmt: skip
        fields = line.split("|")
        if len(fields) == 7 and fields[1] not in ("PENDING", "RUNNING") and all(fields):
            return "|".join(fields[:6])
        assert time.monotonic() < deadline, f"sacct has no completed job {job}: {line!r}"
        time.sleep(0.2)


def test_up_again_only_checks(own_cluster):
    before = daemon_pids()
    result = slurm_up("up")
    assert daemon_pids() == before
    assert {"slurmctld", "slurmd"} <= before.keys()
    assert "stopping" not in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith("(accounting: no, nodes: 1)")


def test_a_job_gets_the_resources_it_asked_for(own_cluster, tmp_path):
    job = submit(own_cluster, tmp_path / "job.out")
    fields = finished_job(job)
    assert fields["JobState"] == "COMPLETED"
    assert (fields["NumCPUs"], fields["CPUs/Task"]) == ("2", "2")
    assert fields["MinMemoryNode"] == "500M"
    assert fields["TimeLimit"] == "00:01:00"
    assert (tmp_path / "job.out").read_text() == "cpus=2\n"


def test_accounting_on_then_off(own_cluster, tmp_path):
    try:
        assert own_cluster.accounting(True) is True
        assert own_cluster.account() == "root"
        job = submit(own_cluster, tmp_path / "accounted.out")
        assert accounted_job(job) == f"{job}|COMPLETED|2|500M|00:01:00|root"
    finally:
        assert own_cluster.accounting(False) is False
    sacct = command("sacct")
    assert sacct.returncode != 0
    assert "accounting storage is disabled" in sacct.stdout + sacct.stderr
    assert finished_job(submit(own_cluster, tmp_path / "after.out"))["JobState"] == "COMPLETED"


def free_port() -> int:
    """A port no one listens on now (torchrun's default 29500 may be another job's)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def submit_torchrun(cluster: SlurmCluster, tmp_path: Path) -> str:
    """An sbatch job on 2 nodes, one task each, whose srun starts torchrun on both: they meet
    through c10d rendezvous on this host and run ALL_REDUCE; returns its id."""
    (tmp_path / "all_reduce.py").write_text(ALL_REDUCE)
    (tmp_path / "job.sh").write_text(
        "#!/bin/bash\n"
        f"srun --nodes 2 --ntasks 2 --ntasks-per-node 1 {sys.executable} -m torch.distributed.run"
        " --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d"
        f" --rdzv-endpoint $(hostname):{free_port()} --rdzv-id $SLURM_JOB_ID all_reduce.py\n"
    )
    result = command(
        "sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--cpus-per-task", "1",
        "--mem", "1000", "--time", "1", "--account", cluster.account(),
        "--partition", cluster.partition, "--chdir", str(tmp_path),
        "--output", str(tmp_path / "job.out"), str(tmp_path / "job.sh"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def node_slurmds() -> list[int]:
    """The pids of the slurmd slurm_up.sh started per node, where it runs several."""
    return [int(path.read_text()) for path in RUN.glob("slurmd-*.pid")]


def test_a_torchrun_job_across_two_nodes(own_cluster, tmp_path):
    job, slurmds = None, []
    try:
        assert own_cluster.nodes(2) == 2
        slurmds = node_slurmds()
        assert len([pid for pid in slurmds if running(pid, "slurmd")]) == 2
        job = submit_torchrun(own_cluster, tmp_path)
        fields = finished_job(job)
        output = (tmp_path / "job.out").read_text()
        assert fields["JobState"] == "COMPLETED", output
        lines = sorted(line.split()[1:] for line in output.splitlines() if "all_reduce " in line)
        assert [(rank, world, total) for rank, world, _, total in lines] == [
            ("0", "2", "3"),
            ("1", "2", "3"),
        ], output
        assert sorted(node for _, _, node, _ in lines) == own_cluster.node_names()
    finally:
        if job is not None:
            command("scancel", job)
        assert own_cluster.nodes(1) == 1
    assert not [pid for pid in slurmds if running(pid)]
    assert node_slurmds() == []


def test_a_bad_node_count_is_one_clear_error():
    result = command(str(SCRIPT), "up", "--nodes", "two")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "slurm_up.sh: --nodes takes a node count (1 or more), not 'two'"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs it as another user with runuser: needs root")
def test_not_root_is_one_clear_error():
    """Run as nobody, reading the script from stdin: a fresh clone's folder (mktemp's 0700)
    may be closed to nobody, which would fail before the script's own check."""
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", "bash", "-s", "up"],
        stdin=SCRIPT.open(), capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "slurm_up.sh: must run as root: it writes /etc/slurm and starts daemons"
    ]


def stop_process(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def munge_answers() -> bool:
    credential = command("munge", "-n")
    return subprocess.run(["unmunge"], input=credential.stdout, capture_output=True).returncode == 0


def test_down_stops_its_own_daemons_and_no_other(own_cluster):
    stopped = daemon_pids()
    foreign = None
    try:
        slurm_up("down")
        assert not [name for name, pid in stopped.items() if running(pid)]
        assert not [path for path in PID_FILES.values() if path.exists()]
        if not munge_answers():  # then a munged of someone else's: `up` uses it, `down` keeps it
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            foreign = int(SYSTEM_MUNGE_PID.read_text())
            slurm_up("up")
            assert "munged" not in daemon_pids()
            slurm_up("down")
            assert running(foreign, "munged")
    finally:
        if foreign is not None and running(foreign):
            stop_process(foreign)
        slurm_up("up")
