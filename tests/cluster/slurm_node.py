"""The one-node SLURM of the cluster tests as they see it (conftest.py's `slurm_cluster`), and
tests/cluster/slurm_up.sh, which starts, switches and stops it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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

    def accounting(self, on: bool) -> bool:
        """Switch job accounting on or off (slurm_up.sh restarts slurmctld and slurmd); skips the
        test where this cluster is not slurm_up.sh's to switch. Returns whether it is on."""
        if self.accounting_on() == on:
            return on
        if os.geteuid() != 0 or not ours():
            pytest.skip("job accounting can be switched only as root on slurm_up.sh's cluster")
        if on and missing("slurmdbd", "mariadbd"):
            pytest.skip(
                f"missing {', '.join(missing('slurmdbd', 'mariadbd'))} for job accounting "
                "(apt-get install slurmdbd mariadb-server)"
            )
        slurm_up("up", *(["--accounting"] if on else []))
        return self.accounting_on()


def default_partition() -> str:
    """sinfo marks the default partition with a `*`; else the first one."""
    names = command("sinfo", "-h", "-o", "%P").stdout.split()
    marked = [name.rstrip("*") for name in names if name.endswith("*")]
    return (marked or [name.rstrip("*") for name in names] or ["debug"])[0]
