"""A real single-node SLURM (slurmctld + slurmd) in a temporary folder, for the SLURM tests.

Needs Debian's ``slurm-wlm`` (``.ci/run`` installs it) and root (SlurmUser=root,
auth/none).  The daemons use free ports and their own state folder, so they do not
touch a system SLURM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["slurm_available", "LocalSlurm"]


def slurm_available() -> str | None:
    """None if a local SLURM can be started here, else the reason why not."""
    for exe in ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo"):
        if shutil.which(exe) is None:
            return f"{exe} not installed (apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "the one-node SLURM test runs its daemons as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Start/stop a one-node cluster; ``env`` points SLURM commands at it."""

    def __init__(self, folder: Path, cpus: int | None = None, memory_mb: int = 8000) -> None:
        self.folder = Path(folder)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.conf = self.folder / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        f = self.folder
        for sub in ("state", "spool"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""ClusterName=pipelinetest
SlurmctldHost={self.host}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd.pid
SlurmctldLogFile={f}/slurmctld.log
SlurmdLogFile={f}/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
KillWait=2
NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout: float = 30.0) -> None:
        self._write_conf()
        subprocess.run(["slurmctld", "-c"], env=self.env, check=True)
        subprocess.run(["slurmd", "-c"], env=self.env, check=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "idle*", "mixed", "allocated"):
                return
            time.sleep(0.5)
        log = self.folder / "slurmctld.log"
        raise RuntimeError(f"local SLURM did not come up: {out.stdout} {out.stderr}; "
                           f"log: {log.read_text()[-2000:] if log.exists() else ''}")

    def jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=self.env, capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if line.strip()]

    def jobs_after_draining(self, timeout: float = 30.0) -> list[str]:
        """The queue once it has emptied, or as it is after ``timeout`` seconds."""
        deadline = time.time() + timeout
        while self.jobs() and time.time() < deadline:
            time.sleep(0.5)
        return self.jobs()

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for name in ("slurmd.pid", "slurmctld.pid"):
            pid_file = self.folder / name
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.5)
