"""The SLURM of the cluster tests as they see it (conftest.py's `slurm_cluster`: one node, or
several on this one host), and tests/cluster/slurm_up.sh, which starts, switches and stops it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("slurm_up.sh")
RUN = Path("/run/slurm-test")  # slurm_up.sh's pid files: a cluster it started
READY = {"idle", "mixed", "allocated", "completing"}
# the daemons live in /usr/sbin, which a non-root PATH may lack
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
CORE_PACKAGES = "munge slurmctld slurmd slurm-client"
ACCOUNTING = re.compile(r"^AccountingStorageType\s*=\s*accounting_storage/slurmdbd", re.M)
QUEUE_WAIT_S = 600  # how long a mode switch waits for others' jobs to leave the queue


def command(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client or slurm_up.sh; the result is checked by the caller."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def slurm_up(*args: str) -> subprocess.CompletedProcess[str]:
    """slurm_up.sh, failing the test with its output when it fails."""
    result = command(str(SCRIPT), *args, timeout=300)
    if result.returncode != 0:
        pytest.fail(
            f"slurm_up.sh {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}{result.stderr}",
            pytrace=False,
        )
    return result


def node_states() -> list[str]:
    """The node states sinfo reports; none where no slurmctld answers `scontrol ping` (sinfo
    would retry for 9 s first)."""
    if missing("sinfo", "scontrol") or command("scontrol", "ping").returncode != 0:
        return []
    result = command("sinfo", "-h", "-N", "-o", "%T")
    return result.stdout.split() if result.returncode == 0 else []


def cluster_answers() -> bool:
    return any(state in READY for state in node_states())


def running(pid: int, program: str | None = None) -> bool:
    """A live process (a zombie waiting for PID 1 to reap it is not), running that program."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, state = stat.split(" (", 1)[1].rsplit(") ", 1)
    return state.split()[0] != "Z" and program in (None, name)


def ours() -> bool:
    """slurm_up.sh started the running slurmctld, so it may restart it in another mode."""
    try:
        return running(int((RUN / "slurmctld.pid").read_text()), "slurmctld")
    except (OSError, ValueError):
        return False


def wait_for_empty_queue(timeout: float = QUEUE_WAIT_S) -> None:
    """A mode switch restarts slurmctld and every slurmd: it waits until no job (another
    test's, someone's) is queued or running, and skips where the queue stays busy."""
    deadline = time.monotonic() + timeout
    while jobs := command("squeue", "-h", "-o", "%i").stdout.split():
        if time.monotonic() >= deadline:
            pytest.skip(
                f"squeue still lists jobs {' '.join(jobs)} after {timeout:.0f} s: "
                "the cluster cannot switch modes under them"
            )
        time.sleep(1)


def missing(*programs: str) -> list[str]:
    return [name for name in programs if shutil.which(name, path=SBIN_PATH) is None]


def cannot_start() -> str | None:
    """Why slurm_up.sh cannot start a cluster here (it installs no packages for a test)."""
    lacking = missing("sinfo", "slurmctld", "slurmd", "munged")
    problems = [] if os.geteuid() == 0 else ["not root"]
    if lacking:
        problems.append(f"missing {', '.join(lacking)} (apt-get install {CORE_PACKAGES})")
    if not problems:
        return None
    why = "; ".join(problems)
    return f"no SLURM cluster answers sinfo, and {SCRIPT.name} cannot start one: {why}"


@dataclass(frozen=True)
class SlurmCluster:
    partition: str  # the default partition, where the tests' jobs go

    def accounting_on(self) -> bool:
        """Whether slurmctld stores jobs in slurmdbd (sacct reads them back)."""
        return ACCOUNTING.search(command("scontrol", "show", "config").stdout) is not None

    def account(self) -> str:
        """An account that exists: sacctmgr's first with accounting; without, any name passes."""
        if not self.accounting_on():
            return "root"
        listed = command("sacctmgr", "-n", "-P", "list", "account", "format=account").stdout
        return listed.split()[0] if listed.split() else "root"

    def env(self) -> dict[str, str]:
        """The environment for sbatch and Snakemake's SLURM profile (profiles/slurm reads these)."""
        return {**os.environ, "SBATCH_ACCOUNT": self.account(), "SBATCH_PARTITION": self.partition}

    def node_names(self) -> list[str]:
        """The nodes' names, sorted (slurm_up.sh's several nodes all run on this host)."""
        return sorted(set(command("sinfo", "-h", "-N", "-o", "%N").stdout.split()))

    def node_count(self) -> int:
        return len(self.node_names())

    def accounting(self, on: bool) -> bool:
        """Switch job accounting on or off, keeping the nodes; skips the test where this cluster
        is not slurm_up.sh's to switch. Returns whether it is on."""
        if self.accounting_on() == on:
            return on
        if on and missing("slurmdbd", "mariadbd"):
            pytest.skip(
                f"missing {', '.join(missing('slurmdbd', 'mariadbd'))} for job accounting "
                "(apt-get install slurmdbd mariadb-server)"
            )
        self._switch("job accounting", on, self.node_count() or 1)
        return self.accounting_on()

    def nodes(self, count: int) -> int:
        """Switch to that many nodes, keeping accounting as it is; skips the test where this
        cluster is not slurm_up.sh's to switch. Returns the node count."""
        if self.node_count() == count:
            return count
        self._switch("the node count", self.accounting_on(), count)
        return self.node_count()

    def _switch(self, what: str, accounting: bool, nodes: int) -> None:
        """slurm_up.sh up in that mode: it rewrites slurm.conf and restarts the daemons, once the
        queue is empty."""
        if os.geteuid() != 0 or not ours():
            pytest.skip(f"{what} can be switched only as root on slurm_up.sh's cluster")
        wait_for_empty_queue()
        slurm_up("up", *(["--accounting"] if accounting else []), "--nodes", str(nodes))


def default_partition() -> str:
    """sinfo marks the default partition with a `*`; else the first one."""
    names = command("sinfo", "-h", "-o", "%P").stdout.split()
    marked = [name.rstrip("*") for name in names if name.endswith("*")]
    return (marked or [name.rstrip("*") for name in names] or ["debug"])[0]
