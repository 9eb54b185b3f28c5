"""A real one-node Slurm cluster on this host, started once per test session.

Debian's ``slurm-wlm`` and ``munge`` are installed when missing (root and apt needed; otherwise the
tests skip and say why). munged, slurmctld and slurmd run in the foreground as children of this
process, from a config directory the session owns (its own munge socket and key, its own ports), so
nothing of the host's own Slurm or munge is touched and teardown stops exactly what was started.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")


def _ensure_installed() -> None:
    if all(shutil.which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("slurm tests need apt-get install slurm-wlm munge: not root, or no apt-get on this host")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd, timeout in ((["apt-get", "update"], 300), (["apt-get", "install", "-y", "slurm-wlm", "munge"], 900)):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            pytest.skip(f"slurm tests need apt-get install slurm-wlm munge: `{' '.join(cmd)}` timed out")
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            pytest.skip(f"slurm tests need apt-get install slurm-wlm munge: {' | '.join(tail)}")
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        pytest.skip(f"slurm tests need apt-get install slurm-wlm munge: still missing {', '.join(missing)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _real_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    return 1024


def write_config(root: Path, *, node: str) -> Path:
    """slurm.conf for one node named like this host, with 2 CPUs, no cgroups and no accounting."""
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=farmtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=15
MinJobAge=3600
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    # No cgroup plugin is loaded (proctrack/linuxproc, task/none); slurmd still reads this file.
    (root / "cgroup.conf").write_text("IgnoreSystemd=yes\n")
    return conf


@dataclass
class SlurmCluster:
    """The session's cluster: run Slurm commands against it and follow jobs."""

    root: Path
    node: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr or proc.stdout}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a mapping (JobState, Restarts, ExitCode, BatchHost, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "?")

    def wait_state(self, job_id: str, states: set[str], *, timeout: float, log: Path | None = None) -> str:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        where = log.read_text()[-3000:] if log is not None and log.exists() else "(no log)"
        raise AssertionError(f"job {job_id} is {state}, not {states}, after {timeout} s; log:\n{where}")

    def release(self, job_id: str) -> None:
        """Start a requeued job now: Slurm holds requeued jobs back ~2 min (BeginTime) against loops."""
        self.wait_state(job_id, {"PENDING"}, timeout=60)
        # slurmd refuses a credential issued in the same second it revoked the last attempt's
        # ("Job credential revoked"): let the node finish with that attempt first.
        _wait_idle(self)
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def _start(cluster: SlurmCluster, cmd: list[str], *, ready: str | None = None) -> None:
    log = (cluster.root / f"{Path(cmd[0]).name}.out").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cluster.env)
    cluster.procs.append(proc)
    if ready:
        deadline = time.monotonic() + 20
        while not Path(ready).exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not start; see {log.name} in {cluster.root}")
            time.sleep(0.1)


def _wait_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline and all(p.poll() is None for p in cluster.procs):
        state = cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip()
        if state == "idle":
            return
        time.sleep(0.5)
    names = ("slurmctld.out", "slurmd.out", "slurmctld.log", "slurmd.log")
    logs = "\n".join((cluster.root / n).read_text()[-1500:] for n in names if (cluster.root / n).exists())
    raise RuntimeError(f"the Slurm node is {state!r}, not idle, after 60 s:\n{logs}")


def _cancel_all(cluster: SlurmCluster) -> None:
    """Jobs a failed test left behind: cancel them while slurmd can still reap their processes."""
    if not cluster.procs or cluster.procs[-1].poll() is not None:
        return
    jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
    if not jobs:
        return
    cluster.run("scancel", "--full", *jobs, check=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    _ensure_installed()
    if os.geteuid() != 0:
        pytest.skip("slurm tests run slurmd, which needs root here")
    root = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]
    conf = write_config(root, node=node)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env.pop("SLURM_JOB_ID", None)
    cluster = SlurmCluster(root=root, node=node, env=env)
    try:
        _start(cluster, ["munged", "--foreground", "--force", f"--socket={root}/munge.socket",
                         f"--key-file={key}", f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                         f"--seed-file={root}/munge.seed"], ready=f"{root}/munge.socket")
        _start(cluster, ["slurmctld", "-D", "-i", "-f", str(conf)])
        _start(cluster, ["slurmd", "-D", "-f", str(conf)])
        _wait_idle(cluster)
        yield cluster
    finally:
        _cancel_all(cluster)
        for proc in reversed(cluster.procs):
            proc.terminate()
        for proc in reversed(cluster.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def slurm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo corpus, prepared once, that every job of the session trains on."""
    from farm.config import DataConfig
    from farm.data import prepare

    out = tmp_path_factory.mktemp("slurm-data") / "demo-128"
    prepare(DataConfig(dir=str(out), source="demo", seq_len=128, vocab_size=1024, max_bytes=1_000_000),
            progress=False)
    return out


def farm_python() -> str:
    return sys.executable
