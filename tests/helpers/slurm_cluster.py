"""A real one-node SLURM cluster for the tests: Debian's munged, slurmctld and slurmd from a temp config.

Nothing is installed here (`make test` installs slurm-wlm + munge when it runs as root). Every
session gets its own folder, munge socket and key, ports, state, spool and logs, so it collides
with nothing else on the machine (its slurm.conf reaches the commands through SLURM_CONF). The
daemons a session started are recorded in a state file by PID; a later session stops those of a
session that is no longer alive (after checking each PID still runs that session's config), and
never touches daemons it did not start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
STATE_DIR = Path(tempfile.gettempdir()) / "mame_lightning_slurm"
PARTITION = "debug"
CPUS = 2
MEMORY_MB = 4000


def unavailable_reason() -> str | None:
    """Why this machine cannot run the cluster, or None when it can."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"SLURM tests need slurm-wlm and munge ({', '.join(missing)} not found; `make test` installs them as root)"
    if os.geteuid() != 0:
        return "SLURM tests start munged, slurmctld and slurmd and must run as root"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _alive(pid: int) -> bool:
    if pid <= 0:  # never a process group or "every process"
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stop_pid(pid: int, marker: str, timeout: float = 15.0) -> None:
    """SIGTERM (then SIGKILL) a daemon, only while its command line still names our config."""
    if pid <= 0 or not _alive(pid) or marker not in _cmdline(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid) or marker not in _cmdline(pid):
            return
        time.sleep(0.2)
    if marker in _cmdline(pid):
        os.kill(pid, signal.SIGKILL)


def slurm_conf_text(root: Path, node: str, ports: tuple[int, int]) -> str:
    """The lines ../shared/FACTS.md found necessary, with every path under `root`."""
    return "\n".join([
        f"ClusterName=mame{ports[0]}",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ports[0]}",
        f"SlurmdPort={ports[1]}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SlurmdParameters=config_overrides",
        "MpiDefault=none",
        "SchedulerType=sched/backfill",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "JobRequeue=1",
        "ReturnToService=2",
        "KillWait=5",
        "MinJobAge=600",
        f"PlugStackConfig={root}/plugstack.conf",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={MEMORY_MB} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    partition: str = PARTITION
    cpus: int = CPUS
    memory_mb: int = MEMORY_MB
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once forgotten."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        fields = {}
        for token in proc.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {info}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)


def _state_file(session_pid: int) -> Path:
    return STATE_DIR / f"session-{session_pid}.json"


def _record(cluster: SlurmCluster) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    path = _state_file(os.getpid())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"session_pid": os.getpid(), "root": str(cluster.root), "conf": str(cluster.conf),
                               "pids": cluster.pids}))
    os.replace(tmp, path)


def _cancel_all_jobs(conf: Path, timeout: float = 20) -> None:
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=30)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(0.5)


def _stop_recorded(state: dict) -> None:
    marker = state["root"]
    if _alive(int(state["pids"].get("slurmctld", 0))):
        try:
            _cancel_all_jobs(Path(state["conf"]))
        except (OSError, subprocess.SubprocessError):
            pass
    for name in ("slurmd", "slurmctld", "munged"):
        pid = state["pids"].get(name)
        if pid:
            _stop_pid(int(pid), marker)


def stop_stale_sessions() -> None:
    """Stop the daemons of earlier sessions of these tests that ended without stopping them."""
    if not STATE_DIR.is_dir():
        return
    for path in STATE_DIR.glob("session-*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if state.get("session_pid") != os.getpid() and _alive(int(state.get("session_pid", 0))):
            continue  # another live session owns it
        _stop_recorded(state)
        path.unlink(missing_ok=True)


def _read_pid(path: Path, timeout: float = 20) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.1)
    raise RuntimeError(f"no PID file {path}")


def start_cluster(root: Path) -> SlurmCluster:
    node = socket.gethostname().split(".")[0]
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o711)  # munged checks its socket folder's permissions
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf_text(root, node, tuple(_free_ports(2))))
    cluster = SlurmCluster(root=root, conf=conf, node=node)
    try:
        m = root / "munge"
        subprocess.run([_binary("munged"), "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
                        f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"],
                       check=True, capture_output=True, timeout=30)
        cluster.pids["munged"] = _read_pid(m / "munged.pid")
        _record(cluster)
        subprocess.run([_binary("slurmctld"), "-f", str(conf)], check=True, capture_output=True, timeout=30,
                       env=cluster.env)
        cluster.pids["slurmctld"] = _read_pid(root / "slurmctld.pid")
        _record(cluster)
        subprocess.run([_binary("slurmd"), "-f", str(conf)], check=True, capture_output=True, timeout=30,
                       env=cluster.env)
        cluster.pids["slurmd"] = _read_pid(root / "slurmd.pid")
        _record(cluster)
        deadline = time.time() + 60
        while True:
            state = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            if state.startswith("idle"):
                break
            if time.time() > deadline:
                raise RuntimeError(f"the SLURM node did not become idle (state {state!r})\n{cluster.logs()}")
            time.sleep(0.3)
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    _stop_recorded({"root": str(cluster.root), "conf": str(cluster.conf), "pids": cluster.pids})
    _state_file(os.getpid()).unlink(missing_ok=True)
