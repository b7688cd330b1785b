"""A one-node Slurm cluster on localhost, for tests: munged, slurmctld and slurmd in a temp dir.

Debian's slurm-wlm runs here without systemd or cgroups. Everything the daemons and the clients
need (config, state, spool, logs, munge key) lives under one directory, whose slurm.conf
``SLURM_CONF`` points to; only munged's socket lies in a directory of its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
INSTALL_TIMEOUT_S = 300


def install_slurm() -> str | None:
    """Install slurm-wlm and munge when missing; return why Slurm is unavailable, or None."""
    if all(shutil.which(name) for name in DAEMONS):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"'{' '.join(command)}' did not finish in {INSTALL_TIMEOUT_S} s"
        if done.returncode != 0:
            return f"'{' '.join(command)}' failed: {(done.stdout + done.stderr)[-2000:]}"
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    return f"installed slurm-wlm and munge but {missing} are still missing" if missing else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd on this host, one partition of one node; start() then stop()."""

    def __init__(self, root: Path):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # munged wants every directory above its socket open to all, and a socket path is short:
        # so the socket lives in a directory of its own under the system's temp dir.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="munge-"))
        self.socket_dir.chmod(0o755)
        self.socket = self.socket_dir / "munge.sock"
        self._daemons: dict[str, subprocess.Popen] = {}

    def _write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        root = self.root
        # cred_expire and the scheduler intervals make a requeued job start again within seconds
        # (it waits cred_expire, 120 s by default); KillWait bounds how long cancelling takes.
        self.conf.write_text(f"""\
ClusterName=fmsbamba-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmdParameters=config_overrides
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, *command: str) -> None:
        with open(self.root / "log" / f"{command[0]}.out", "w") as log:
            self._daemons[command[0]] = subprocess.Popen(command, env=self.env, stdout=log,
                                                         stderr=subprocess.STDOUT)

    def start(self, timeout_s: float = 30) -> None:
        """Start the daemons in the foreground (so stop() can end them by pid); wait for the node."""
        self._write_config()
        key = self.root / "munge.key"
        key.touch(mode=0o600)
        key.write_bytes(os.urandom(128))
        self._spawn("munged", "--foreground", f"--socket={self.socket}", f"--key-file={key}",
                    f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/log/munged.log",
                    f"--seed-file={self.root}/munged.seed")
        try:
            self._wait(lambda: self.socket.exists(), timeout_s, "munged's socket")
            self._spawn("slurmctld", "-D", "-i")
            self._spawn("slurmd", "-D", "-N", self.node)
            self._wait(lambda: self.node_state().startswith("IDLE"), timeout_s, f"node {self.node} to be idle")
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{self.logs()}") from None

    def stop(self) -> None:
        """Cancel every job, wait for them to go, then end the daemons this object started."""
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            self.run("scancel", f"--user={os.getuid()}", check=False)
            try:
                self._wait(lambda: not self.run("squeue", "-h", "-t", "R,CG,CF", check=False).stdout.strip(),
                           30, "jobs to end")
            except TimeoutError:
                pass
        for daemon in self._daemons.values():
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
        for daemon in self._daemons.values():
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=10)
        self._daemons.clear()
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def run(self, *command: str, check: bool = True, timeout_s: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
        return done

    def node_state(self) -> str:
        shown = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return shown.stdout.strip().upper() if shown.returncode == 0 else ""

    def submit(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """`sbatch --parsable ARGS` with extra environment; return the job id."""
        done = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The fields of `scontrol show job` (JobState, Restarts, ExitCode, ...)."""
        shown = self.run("scontrol", "-o", "show", "job", job_id)
        fields = {}
        for item in shown.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, states: set[str], timeout_s: float) -> dict[str, str]:
        """Wait until the job is in one of `states`; raise with its record and logs when it is not."""
        info: dict[str, str] = {}

        def reached() -> bool:
            info.update(self.job(job_id))
            return info["JobState"] in states
        try:
            self._wait(reached, timeout_s, f"job {job_id} to reach {sorted(states)}")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; last seen {info.get('JobState')}: {info}\n{self.logs()}") from None
        return info

    def logs(self) -> str:
        """The tail of every daemon's log, for failure messages."""
        tails = []
        for log in sorted((self.root / "log").glob("*")):
            tails.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:]))
        return "\n".join(tails)

    @staticmethod
    def _wait(condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(0.5)
