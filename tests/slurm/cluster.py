"""A real Slurm cluster with job accounting in a temporary directory, for tests.

``munged`` (as the munge user), a throw-away MariaDB (``mariadbd`` on 127.0.0.1), ``slurmdbd -D``
(accounting, so ``sacct`` answers), ``slurmctld -D`` and ``slurmd -D`` run in the background
with everything they write (key, sockets, database, state, spool, logs) under one directory and
on free ports, so the cluster touches nothing system-wide and two test sessions on one machine
do not meet. By default all of them run on this machine, one compute node. Given :class:`Nodes`
(e.g. ``tests.multinode.cluster.Cluster``), the controller side (munged, the database,
slurmdbd, slurmctld) runs on the first node, one slurmd on every node, and the client commands
on the first node too (the login node); the directory must then be visible on every node.
Clients find it through ``SLURM_CONF`` (slurmdbd finds ``slurmdbd.conf`` beside it). Every
process started here, and every job process (they inherit ``SLURM_CONF``), carries that variable
or the directory's path; :meth:`SlurmCluster.stop` ends them all by PID and checks
that none is left.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

SLURM_CONF = """\
ClusterName=ftmpitest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool{per_node}
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd{per_node}.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd{per_node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SchedulerParameters=bf_interval=2,sched_interval=5
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={host}
AccountingStoragePort={dbd_port}
AccountingStoragePass={root}/munge/munge.socket
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
"""A cluster without systemd or cgroups; ``cred_expire=10`` and the scheduler intervals let a
requeued job start again within about 15 s. Jobs are accounted (state, exit code, restarts)
through slurmdbd, but no usage is gathered and no limits are enforced. ``{per_node}`` is ``/%n``
(Slurm puts the node's name there) when several slurmd share the directory."""

SLURMDBD_CONF = """\
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
DbdHost={host}
DbdPort={dbd_port}
SlurmUser=root
PidFile={root}/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StorageLoc=slurm_acct_db
"""
"""slurmdbd on the throw-away database: its root user (no password) over TCP on 127.0.0.1."""

MARIADB_OPTIONS = ("--no-defaults", "--skip-name-resolve", "--innodb-log-file-size=8M")
"""No system option files; small redo log (the database holds a few test jobs)."""


class SlurmError(RuntimeError):
    """The cluster did not start or stop as expected; the message holds the daemons' logs."""


class Nodes(Protocol):
    """Machines to run a multi-node cluster on (``tests.multinode.cluster.Cluster`` is one)."""

    nodes: list[str]
    """Node names (hostnames); the first runs the controller side and the clients."""

    def address(self, node: str) -> str:
        """The node's IPv4 address, which the other nodes reach."""
        ...

    def command(
        self,
        node: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> list[str]:
        """The argv that runs ``cmd`` on ``node`` in ``cwd`` with a clean environment plus
        ``env``."""
        ...

    def listening(self, node: str, port: int) -> bool:
        """Whether a TCP socket on ``node`` listens on ``port``."""
        ...


class SlurmCluster:
    """One controller and one compute node (this machine) rooted at ``root``; with ``nodes``,
    one compute node per node of ``nodes`` (the controller on the first)."""

    def __init__(self, root: Path, nodes: Nodes | None = None):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.node = ""
        self.nodes = nodes

    @property
    def env(self) -> dict[str, str]:
        """The client environment: this process's, without Slurm or ftmpi variables of its
        own, plus ``SLURM_CONF``."""
        keep = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "FTMPI_"))
        }
        return {**keep, "SLURM_CONF": str(self.conf)}

    # ---- daemons ----

    def start(self, timeout: float = 30.0) -> None:
        """Write the key and the configuration, start the daemons (munged, the database,
        slurmdbd, slurmctld, slurmd), wait until the node is idle."""
        self.root.chmod(0o755)  # munged, running as munge, must reach its socket
        for sub in ("state", "spool", "log", "db"):
            (self.root / sub).mkdir()
        self._write_munge_key()
        node_line = _run(["slurmd", "-C"]).splitlines()[0]
        self.node = node_line.split()[0].split("=", 1)[1]
        node_lines = [f"{node_line} State=UNKNOWN"]
        host = socket.gethostname().split(".")[0]
        if self.nodes is not None:  # this machine's hardware, once per node
            hardware = node_line.split(maxsplit=1)[1]
            host = self.node = self.nodes.nodes[0]
            node_lines = [
                f"NodeName={n} NodeAddr={self.nodes.address(n)} {hardware} State=UNKNOWN"
                for n in self.nodes.nodes
            ]
            # a killed node is declared DOWN within ~20 s (default 300 s), so a job that
            # survived it completes (its epilog on the dead node is given up)
            node_lines.insert(0, "SlurmdTimeout=20")
            for n in self.nodes.nodes:  # slurmd needs its spool directory
                (self.root / "spool" / n).mkdir()
        ctld_port, slurmd_port, dbd_port, db_port = _free_ports(4)
        self.conf.write_text(
            SLURM_CONF.format(
                host=host,
                ctld_port=ctld_port,
                slurmd_port=slurmd_port,
                dbd_port=dbd_port,
                root=self.root,
                per_node="" if self.nodes is None else "/%n",
                nodes="\n".join(node_lines),
            )
        )
        dbd_conf = self.root / "slurmdbd.conf"
        dbd_conf.write_text(
            SLURMDBD_CONF.format(host=host, dbd_port=dbd_port, db_port=db_port, root=self.root)
        )
        dbd_conf.chmod(0o600)  # slurmdbd refuses a configuration others can read
        munge = self.root / "munge"
        pw = pwd.getpwnam("munge")
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                f"--key-file={munge}/munge.key",
                f"--socket={munge}/munge.socket",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
            ],
            user=(pw.pw_uid, pw.pw_gid),
        )
        self._start_database(db_port, timeout)
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged's socket")
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait(lambda: self._listening(dbd_port), timeout, "slurmdbd's port")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        if self.nodes is None:
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        else:
            for n in self.nodes.nodes:
                self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-f", str(self.conf)], node=n)
        self._wait(self._node_idle, timeout, f"node(s) {self._node_names()} to be idle")

    def _start_database(self, port: int, timeout: float) -> None:
        """Create an empty MariaDB data directory and start ``mariadbd`` on 127.0.0.1:port."""
        db = self.root / "db"
        data = f"--datadir={db}/data"
        out = subprocess.run(
            [
                "mariadb-install-db",
                *MARIADB_OPTIONS,
                data,
                "--user=root",
                "--skip-test-db",
                "--auth-root-authentication-method=normal",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if out.returncode != 0:
            raise SlurmError(
                f"mariadb-install-db exited with status {out.returncode}:\n"
                f"{out.stdout[-2000:]}{out.stderr[-2000:]}"
            )
        self._spawn(
            "mariadbd",
            [
                "mariadbd",
                *MARIADB_OPTIONS,
                data,
                "--user=root",
                "--bind-address=127.0.0.1",
                f"--port={port}",
                f"--socket={db}/mariadbd.sock",
                f"--pid-file={db}/mariadbd.pid",
                f"--log-error={self.root}/log/mariadbd.log",
                "--innodb-buffer-pool-size=32M",
            ],
        )
        self._wait(lambda: self._listening(port), timeout, "the database's port")

    def stop(self, timeout: float = 30.0) -> list[str]:
        """Cancel every job, stop the daemons, end any process left; returns what was left
        (``pid command`` lines; empty when the shutdown was clean)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.client(["scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name])
            with contextlib.suppress(SlurmError):
                self._wait(lambda: not self.client(["squeue", "-h"]).strip(), timeout, "no jobs")
        slurmds = [name for name in self.procs if name.startswith("slurmd-")]
        for name in ("slurmd", *slurmds, "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        left = self.processes()
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return [f"{pid} {cmd}" for pid, cmd in left.items()]

    def processes(self) -> dict[int, str]:
        """Live processes of this cluster: ``pgrep -f`` on its directory (the daemons, the
        launchers of its jobs) plus every process whose environment holds its ``SLURM_CONF``
        (job processes, whatever their command line)."""
        found = subprocess.run(
            ["pgrep", "-f", str(self.root)], capture_output=True, text=True, check=False
        ).stdout.split()
        pids = {int(p) for p in found} | set(_pids_with_env(f"SLURM_CONF={self.conf}"))
        pids.discard(os.getpid())
        return {pid: cmd for pid in sorted(pids) if (cmd := _cmdline(pid))}

    def logs(self) -> str:
        """The tail of every daemon's log and output, for failure messages."""
        parts = []
        for path in sorted(self.root.glob("log/*.log")) + sorted(self.root.glob("*.daemon.out")):
            parts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def _write_munge_key(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o711)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        pw = pwd.getpwnam("munge")
        for path in (munge, key):
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _spawn(
        self,
        name: str,
        cmd: list[str],
        *,
        node: str | None = None,
        user: tuple[int, int] | None = None,
    ) -> None:
        """Start a daemon, as ``user`` (uid, gid) if given; with :class:`Nodes`, on ``node``
        (default the first)."""
        uid = gid = None
        if self.nodes is not None:
            if user is not None:  # nsenter needs root: drop to the user after it
                ids = [f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups"]
                cmd = ["setpriv", *ids, *cmd]
            host = node or self.nodes.nodes[0]
            cmd = self.nodes.command(host, cmd, env={"SLURM_CONF": str(self.conf)}, cwd=self.root)
        elif user is not None:
            uid, gid = user
        out = open(self.root / f"{name}.daemon.out", "wb")  # noqa: SIM115 (outlives this call)
        with out:
            self.procs[name] = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                env=self.env,
                start_new_session=True,
                user=uid,
                group=gid,
            )

    def _check_daemons(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with status {proc.returncode}\n{self.logs()}")

    def _listening(self, port: int) -> bool:
        self._check_daemons()
        if self.nodes is not None:
            return self.nodes.listening(self.nodes.nodes[0], port)
        with socket.socket() as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _node_names(self) -> list[str]:
        return [self.node] if self.nodes is None else self.nodes.nodes

    def _node_idle(self) -> bool:
        """Whether every node is idle."""
        self._check_daemons()
        state = self.client(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return state.split() == ["idle"] * len(self._node_names())

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise SlurmError(f"gave up after {timeout} s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)

    # ---- clients ----

    def client(
        self,
        cmd: list[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        check: bool = True,
        timeout: float = 30.0,
    ) -> str:
        """Run a Slurm client command against this cluster; its standard output. With
        :class:`Nodes`, on the first node, in a clean environment plus ``SLURM_CONF`` and
        ``env`` (what ``sbatch --export=ALL`` passes on to a job)."""
        if self.nodes is not None:
            env = {"SLURM_CONF": str(self.conf), **(env or {})}
            cmd = self.nodes.command(self.nodes.nodes[0], cmd, env=env, cwd=cwd or self.root)
            return _run(cmd, check=check, timeout=timeout)
        return _run(cmd, env={**self.env, **(env or {})}, cwd=cwd, check=check, timeout=timeout)

    def sbatch(
        self, script: Path, *options: str, env: Mapping[str, str] | None = None, cwd: Path
    ) -> int:
        """Submit ``script`` from ``cwd`` with ``options``; ``env`` reaches the job
        (``--export=ALL``). Returns the job id."""
        out = self.client(
            ["sbatch", "--parsable", "--export=ALL", *options, str(script)], env=env, cwd=cwd
        )
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """The job's ``scontrol show job`` fields (JobState, Restarts, ExitCode, ...)."""
        out = self.client(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait_job(self, job_id: int, done, timeout: float, what: str) -> dict[str, str]:
        """Poll the job until ``done(fields)`` holds; its fields then. Raises
        :class:`SlurmError` with the job's fields after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not done(fields := self.job(job_id)):
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id}: gave up after {timeout} s waiting for {what}: {fields}"
                )
            time.sleep(1)
        return fields

    def accounting(self, job_id: int, timeout: float = 30.0) -> tuple[str, str]:
        """``(State, ExitCode)`` of the job's allocation in ``sacct`` (its latest run, for a
        requeued job), once accounting has it in a final state; slurmctld sends a job's end to
        slurmdbd a moment after ``scontrol`` shows it. Raises :class:`SlurmError` after
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        cmd = ["sacct", "-j", str(job_id), "-X", "-o", "State,ExitCode", "-n", "-P"]
        while True:
            rows = [r.split("|") for r in self.client(cmd).splitlines() if r.strip()]
            if rows and rows[-1][0].split()[0] in FINAL_STATES:
                return rows[-1][0], rows[-1][1]
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id}: no final state in sacct after {timeout} s: {rows}\n"
                    f"{self.logs()}"
                )
            time.sleep(0.5)


FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
)
"""Job states after which a job neither runs nor waits to run."""


def _run(
    cmd: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> str:
    res = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False
    )
    if check and res.returncode != 0:
        raise SlurmError(f"{' '.join(cmd)} exited with status {res.returncode}: {res.stderr}")
    return res.stdout


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pids_with_env(entry: str) -> Iterable[int]:
    needle = entry.encode() + b"\0"
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (d / "environ").read_bytes() + b"\0":
                    yield int(d.name)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
