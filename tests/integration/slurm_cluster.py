"""A real single-node Slurm on localhost for the tests (root only).

`slurm_cluster` (a session-scoped pytest fixture) starts a private `munged`
(own socket, a root-owned copy of /etc/munge/munge.key), then `slurmctld` and
`slurmd` with a slurm.conf in a temp dir: one node `localhost` with the
machine's CPUs, partition `debug`, free non-default ports, state/spool/logs
in the temp dir. It waits until `sinfo` shows the node idle and yields a
`SlurmCluster`; `cluster.env` (with SLURM_CONF) is what clients such as
`sbatch`, `squeue`, `scontrol` and `calmrl launch slurm` need. Teardown
cancels the cluster's jobs and stops the three daemons it started (by pid).

Nothing here skips: a missing install or a daemon that does not come up is a
test failure naming the cause (install with `sudo scripts/install_system_deps.sh`).

By hand: `python -m tests.integration.slurm_cluster` starts one and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pretrain.runtime import free_port

INSTALL_HINT = "install it with `sudo scripts/install_system_deps.sh` (or `apt-get install -y slurm-wlm munge`)"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel")
NODE = "localhost"
PARTITION = "debug"


class SlurmClusterError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"  ({path}: {exc})"
    return "\n".join(f"  {line}" for line in text[-lines:]) or "  (empty)"


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which is not always on a non-login PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def check_installed() -> dict[str, str]:
    """Paths of the daemons and clients; SlurmClusterError names what is missing and how to install it."""
    found = {name: _which(name) for name in (*DAEMONS, *CLIENTS, "mungekey")}
    missing = [n for n, p in found.items() if p is None and n != "mungekey"]
    if missing:
        raise SlurmClusterError(f"Slurm test cluster: {', '.join(missing)} not found; {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise SlurmClusterError(
            "Slurm test cluster: slurmd must run as root to launch jobs; run this test as root (CI containers do)"
        )
    return {n: p for n, p in found.items() if p is not None}


def ensure_munge_key(path: Path = Path("/etc/munge/munge.key"), mungekey: str | None = None) -> Path:
    """Create the system munge key if there is none (mungekey, else 1 KiB from /dev/urandom)."""
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if mungekey:
        subprocess.run([mungekey, "--create", f"--keyfile={path}"], check=True, capture_output=True)
    else:
        path.write_bytes(os.urandom(1024))
    path.chmod(0o400)
    return path


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def logs(self) -> dict[str, Path]:
        # munged logs to stderr in the foreground; slurmctld/slurmd to the files slurm.conf names.
        return {
            "munged": self.root / "log" / "munged.stdout",
            "slurmctld": self.root / "log" / "slurmctld.log",
            "slurmd": self.root / "log" / "slurmd.log",
        }

    def logs_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {name} ({path}):\n{_tail(path, lines)}" for name, path in self.logs.items())

    def run(self, *cmd: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
        """Run a Slurm client against this cluster."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def node_state(self) -> str:
        out = self.run("sinfo", "-h", "-N", "-n", NODE, "-o", "%T", timeout=15)
        return out.stdout.strip() if out.returncode == 0 else f"sinfo failed: {out.stderr.strip()}"

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, ExitCode, StdOut, ...); {} once forgotten."""
        out = self.run("scontrol", "show", "job", "-o", job_id, timeout=15)
        if out.returncode != 0:
            return {}
        info: dict[str, str] = {}
        for token in out.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in info:
                info[key] = value
        return info

    def wait_job(self, job_id: str, timeout: float, poll: float = 2.0) -> dict[str, str]:
        """Poll until the job leaves PENDING/RUNNING/...; the last job info (JobState == 'TIMEOUT_WAIT' on a time-out)."""
        active = {
            "PENDING",
            "CONFIGURING",
            "RUNNING",
            "COMPLETING",
            "SUSPENDED",
            "REQUEUED",
            "RESIZING",
            "SIGNALING",
            "STAGE_OUT",
        }
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id) or info
            if info and info.get("JobState") not in active:
                return info
            time.sleep(poll)
        return {**info, "JobState": "TIMEOUT_WAIT", "LastState": info.get("JobState", "?")}

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115  (the daemon writes it for its life)
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True
        )
        log.close()

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started (slurmd, slurmctld, munged)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--partition", PARTITION, timeout=15)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    q = self.run("squeue", "-h", "-o", "%i", timeout=15)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(1)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def write_conf(root: Path, cpus: int, ctld_port: int, slurmd_port: int, munge_socket: Path) -> Path:
    state, spool, log = root / "state", root / "spool", root / "log"
    for d in (state, spool, log):
        d.mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
# Single-node test cluster written by tests/integration/slurm_cluster.py
ClusterName=calmrltest
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={state}
SlurmdSpoolDir={spool}/slurmd-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={log}/jobcomp.txt
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` for 10 minutes (no accounting, so no sacct).
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={NODE} NodeHostname={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start_cluster(root: Path, ready_timeout: float = 60) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under `root`; wait until the node is idle."""
    paths = check_installed()
    system_key = ensure_munge_key(mungekey=paths.get("mungekey"))
    root.chmod(0o755)  # munged wants every folder above its socket executable by all
    munge_dir = root / "munge"
    munge_dir.mkdir(parents=True, exist_ok=True)
    munge_dir.chmod(0o755)
    key = munge_dir / "munge.key"  # munged insists that the key is owned by the user it runs as (root here)
    shutil.copyfile(system_key, key)
    key.chmod(0o400)
    socket_path = munge_dir / "munge.socket"

    cpus = _cpus()
    conf = write_conf(root, cpus, free_port(), free_port(), socket_path)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin:/sbin"
    cluster = SlurmCluster(root=root, conf=conf, env=env, cpus=cpus)
    try:
        cluster._start(
            "munged",
            [
                paths["munged"],
                "--foreground",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ],
        )
        _wait(lambda: socket_path.exists(), 15, "munged did not create its socket", cluster)
        cluster._start("slurmctld", [paths["slurmctld"], "-D", "-c", "-f", str(conf)])
        _wait(
            lambda: cluster.run("scontrol", "ping", timeout=10).stdout.count("UP") > 0,
            30,
            "slurmctld did not answer `scontrol ping`",
            cluster,
        )
        cluster._start("slurmd", [paths["slurmd"], "-D", "-N", NODE, "-f", str(conf)])
        _wait(
            lambda: cluster.node_state().rstrip("*") == "idle",
            ready_timeout,
            f"node {NODE} did not become idle",
            cluster,
        )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead:
            raise SlurmClusterError(
                f"{what}: {', '.join(dead)} exited early "
                f"(codes {[cluster.procs[n].returncode for n in dead]})\n"
                f"{cluster.logs_tail()}\n{_stdout_tails(cluster)}"
            )
        try:
            if ready():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.5)
    state = cluster.node_state() if "slurmctld" in cluster.procs else "-"
    raise SlurmClusterError(
        f"{what} within {timeout:.0f} s (node state: {state})\n{cluster.logs_tail()}\n{_stdout_tails(cluster)}"
    )


def _stdout_tails(cluster: SlurmCluster) -> str:
    return "\n".join(
        f"--- {n} stdout/stderr:\n{_tail(cluster.root / 'log' / f'{n}.stdout', 20)}" for n in cluster.procs
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node Slurm (see the module docstring); fails, never skips, when it cannot start."""
    # Short path: Unix socket paths are limited to ~108 bytes, pytest's tmp paths can be long.
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    try:
        cluster = start_cluster(root)
    except SlurmClusterError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    c = start_cluster(root)
    print(f"Slurm up: export SLURM_CONF={c.conf}   (Ctrl-C stops it)")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
