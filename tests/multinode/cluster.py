"""A real multi-node cluster on one machine: every node a set of Linux namespaces (root only).

Node ``nK`` is a network namespace with one veth onto a Linux bridge of its cluster's own (no
uplink, no address on the bridge, no NAT, no default route; the subnet ``10.211.X.0/24`` exists
only on that bridge), address ``10.211.X.K``, plus a long-lived *holder* process that owns the
node's UTS namespace (hostname ``nK``) and a private mount namespace in which ``/etc/hosts``
names every node of the cluster, ``/tmp`` and ``/dev/shm`` are fresh tmpfs mounts (node-local
disk and memory) and the host's cgroup hierarchies are mounted again (``ip netns exec`` mounts a
fresh ``/sys`` that hides them; slurmd needs them). Everything else, the repository and its
venv included, is the host's: the cluster's directory (never under ``/tmp``) and its
``shared/`` subdirectory are the same path on the host and on every node, the cluster's shared
filesystem.

A command runs on a node through ``nsenter -t HOLDER -n -u -m`` with the clean environment ssh
gives (:meth:`Cluster.command`). Open MPI reaches nodes through the ssh agent ``nsrsh`` beside
this file (``PRTE_MCA_plm_ssh_agent=<dir>/nsrsh``, :attr:`Cluster.mpi_env`). The host has no
address on the bridge, so a launcher (``mpirun``) runs on a node, as on a login node.

Names carry a per-cluster prefix ``ftmn`` + 4 hex digits (netns ``<prefix>-nK``, bridge
``<prefix>br``, host-side veth ``<prefix>nK``), registered with the creating process's pid in
``/run/ftmpi-multinode/<prefix>.json`` before anything is made. A new cluster first removes
clusters whose owner is dead (a crashed run); a live owner's cluster is never touched.

CLI (root): ``python -m tests.multinode.cluster up --nodes 3 --dir DIR`` (then ``run``,
``kill-node``, ``revive``, ``cut-link``, ``restore-link``, ``down``, all with ``--dir DIR``;
``list`` shows every cluster on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from launch.proctree import kill_tree

FAMILY = "ftmn"
"""First letters of every name a cluster makes (netns, bridge, veth)."""
NAME_RE = re.compile(rf"^({FAMILY}[0-9a-f]{{4}})(?:-n\d+|br|n\d+)$")
REGISTRY = Path("/run/ftmpi-multinode")
"""One ``<prefix>.json`` per live cluster (owner pid and start time, directory, subnet)."""
AGENT = Path(__file__).with_name("nsrsh")
SSH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NODE_LOCAL = ("/tmp", "/dev/shm")
KEPT = sorted(
    {
        str(path)
        for path in (Path(__file__).resolve().parents[2], Path(sys.prefix).resolve())
        if any(path.is_relative_to(local) for local in NODE_LOCAL)
    }
)
"""This checkout and its venv where they lie under a node-local path: kept visible on nodes."""


def q(path: object) -> str:
    return shlex.quote(str(path))


class ClusterError(RuntimeError):
    """A cluster operation failed or overran its deadline; the message says what is left."""


@dataclass
class NodeState:
    """What identifies a node's current incarnation: its holder and its namespaces (inodes)."""

    holder: int = 0
    net_ns: int = 0
    mnt_ns: int = 0


def ssh_env() -> dict[str, str]:
    """The environment ssh gives a command on another machine (this user's login variables)."""
    pw = pwd.getpwuid(os.getuid())
    return {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": "/bin/sh",
        "PATH": SSH_PATH,
    }


class Cluster:
    """N nodes ``n1..nN`` of namespaces on this machine, rooted at directory ``root``.

    Make one with :meth:`create` (or :meth:`attach` to one made by another process, e.g. the
    CLI). Every wait has a deadline; an operation that cannot finish raises
    :class:`ClusterError`. :meth:`stop` removes everything and checks that nothing is left.
    """

    def __init__(self, root: Path, prefix: str, subnet: int, nodes: Sequence[str]):
        self.root = root
        self.prefix = prefix
        self.subnet = subnet
        self.nodes = list(nodes)
        self.state: dict[str, NodeState] = {n: NodeState() for n in self.nodes}
        self._holders: dict[str, subprocess.Popen[bytes]] = {}

    # ---- construction ----

    @classmethod
    def create(
        cls,
        nodes: int = 3,
        root: Path | None = None,
        *,
        owner: int | None = None,
        timeout: float = 30.0,
    ) -> Cluster:
        """Build ``nodes`` nodes; returns once every node is up (hostname, hosts file, tmpfs
        and cgroup mounts done). ``root`` (created if missing; default a new directory under
        /var/tmp, removed by :meth:`stop`) must not be node-local (/tmp, /dev/shm). ``owner``:
        the pid whose death makes the cluster a leftover (default this process; 0: none, only
        ``stop``/``down`` removes it). On failure everything made so far is removed."""
        if not 1 <= nodes <= 254:
            raise ValueError(f"nodes must be in 1..254, not {nodes}")
        own_dir = root is None
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="ftmpi-multinode-", dir="/var/tmp"))
        root = root.resolve()
        if any(root.is_relative_to(p) for p in NODE_LOCAL):
            raise ValueError(f"{root} is node-local inside a node; use e.g. /var/tmp")
        root.mkdir(parents=True, exist_ok=True)
        with _registry_lock():
            _cleanup_leftovers(timeout)
            prefix, subnet = _new_identity()
            owner = os.getpid() if owner is None else owner
            _register(prefix, owner, root, subnet, own_dir)
        cluster = cls(root, prefix, subnet, [f"n{k}" for k in range(1, nodes + 1)])
        try:
            cluster._build(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def attach(cls, root: Path) -> Cluster:
        """The cluster whose directory is ``root`` (made by :meth:`create`, in any process)."""
        try:
            saved = json.loads((root / "cluster.json").read_text())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"no cluster in {root}: {exc}") from exc
        cluster = cls(root.resolve(), saved["prefix"], saved["subnet"], saved["nodes"])
        cluster.state = {n: NodeState(**s) for n, s in saved["state"].items()}
        return cluster

    def _build(self, timeout: float) -> None:
        for sub in ("shared", "holders", "cut", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        self.root.chmod(0o755)  # daemons running as other users (munge) reach shared/
        (self.root / "shared").chmod(0o755)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{self.address(n)} {n}" for n in self.nodes]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self.agent.write_text(f'#!/bin/sh\nNSRSH_CLUSTER={self.root} exec {AGENT} "$@"\n')
        self.agent.chmod(0o755)
        _ip("link", "add", self.bridge, "type", "bridge")
        _no_ipv6(self.bridge)
        _ip("link", "set", self.bridge, "up")
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self._start_node(node)
        for node in self.nodes:
            self._wait_node(node, deadline)
        self._save()

    def _start_node(self, node: str) -> None:
        ns, veth = self.netns(node), self.veth(node)
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _no_ipv6(veth)
        _ip("link", "set", veth, "master", self.bridge, "up")
        # the same MAC in every incarnation: peers' ARP caches stay right across a revive
        mac = f"02:00:0a:d3:{self.subnet:02x}:{int(node[1:]):02x}"
        _ip("-n", ns, "link", "set", "eth0", "address", mac)
        _ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", "eth0", "up")
        log = open(self.root / "log" / f"holder-{node}.log", "wb")  # noqa: SIM115
        with log:
            self._holders[node] = subprocess.Popen(
                [
                    *("ip", "netns", "exec", ns, "unshare", "--uts", "--mount"),
                    *("--propagation", "private", "sh", "-ec", self._holder_script(node)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _holder_script(self, node: str) -> str:
        """The holder: hostname, hosts file, node-local tmpfs, cgroups; then it sleeps. A
        checkout (or its venv) that lies under ``/tmp`` (a CI clone, say) stays visible on the
        node at its path: bound aside before the tmpfs hides it, moved back on top after."""
        lines = [f"hostname {node}", f"mount --bind {shlex.quote(str(self.hosts_file))} /etc/hosts"]
        kept = [(q(path), q(self.root / "kept" / node / str(i))) for i, path in enumerate(KEPT)]
        lines += [f"mkdir -p {aside} && mount --bind {path} {aside}" for path, aside in kept]
        lines += [f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {p}" for p in NODE_LOCAL]
        lines += [f"mkdir -p {path} && mount --move {aside} {path}" for path, aside in kept]
        lines += _cgroup_mounts()
        return "\n".join([*lines, "exec sleep infinity"])

    def _wait_node(self, node: str, deadline: float) -> None:
        proc = self._holders[node]
        while _comm(proc.pid) != "sleep":
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "log" / f"holder-{node}.log").read_text(errors="replace")
                why = f"exited with status {proc.returncode}" if proc.poll() is not None else ""
                raise ClusterError(f"node {node} did not come up {why or 'in time'}:\n{log}")
            time.sleep(0.005)
        self.state[node] = NodeState(
            proc.pid, _ns_inode(proc.pid, "net"), _ns_inode(proc.pid, "mnt")
        )
        (self.root / "holders" / node).write_text(f"{proc.pid}\n")

    def _save(self) -> None:
        if not self.root.is_dir():  # removed by stop()
            return
        saved = {
            "prefix": self.prefix,
            "subnet": self.subnet,
            "nodes": self.nodes,
            "state": {n: asdict(s) for n, s in self.state.items()},
        }
        tmp = self.root / "cluster.json.tmp"
        tmp.write_text(json.dumps(saved, indent=1))
        tmp.replace(self.root / "cluster.json")

    # ---- names ----

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def netns(self, node: str) -> str:
        return f"{self.prefix}-{self._check(node)}"

    def veth(self, node: str) -> str:
        """The host side of the node's link (a port of the bridge)."""
        return f"{self.prefix}{self._check(node)}"

    def address(self, node: str) -> str:
        return f"10.211.{self.subnet}.{int(self._check(node)[1:])}"

    @property
    def shared(self) -> Path:
        """A directory at the same path on the host and every node (the shared filesystem)."""
        return self.root / "shared"

    @property
    def hosts_file(self) -> Path:
        return self.root / "hosts"

    @property
    def agent(self) -> Path:
        """The ssh agent for PRRTE (``nsrsh HOST CMD...``), bound to this cluster."""
        return self.root / "nsrsh"

    @property
    def mpi_env(self) -> dict[str, str]:
        """What ``mpirun`` (run on a node) needs in its environment to reach the other nodes."""
        return {"PRTE_MCA_plm_ssh_agent": str(self.agent)}

    def _check(self, node: str) -> str:
        if node not in self.state:
            raise ClusterError(f"no node {node!r} in this cluster (nodes: {self.nodes})")
        return node

    # ---- running commands ----

    def alive(self, node: str) -> bool:
        """Whether the node's holder runs (the node is up, whatever its link)."""
        s = self.state[self._check(node)]
        return s.holder > 0 and _ns_inode(s.holder, "net") == s.net_ns

    def command(
        self,
        node: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> list[str]:
        """The argv that runs ``cmd`` on ``node`` in ``cwd`` (default :attr:`shared`) with the
        environment ssh gives plus ``env`` (nothing else of the caller's). Raises
        :class:`ClusterError` if the node is down; a node that dies later ends the command."""
        if not self.alive(node):
            raise ClusterError(f"node {node} is down")
        variables = [f"{k}={v}" for k, v in {**ssh_env(), **(env or {})}.items()]
        holder = str(self.state[node].holder)
        return [
            *("nsenter", "-t", holder, "-n", "-u", "-m", f"--wd={cwd or self.shared}", "--"),
            *("env", "-i", *variables, *cmd),
        ]

    def start_on(
        self,
        node: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        """Start ``cmd`` on ``node`` (see :meth:`command`) in a session of its own, text pipes;
        the caller waits for it under a deadline and kills its tree if it overruns."""
        return subprocess.Popen(
            self.command(node, cmd, env=env, cwd=cwd),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )

    def run_on(
        self,
        node: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on ``node`` (see :meth:`command`); its result. After ``timeout`` seconds
        the command's whole process tree is killed and :class:`ClusterError` raised, as it is
        for a non-zero exit status with ``check``."""
        proc = self.start_on(node, cmd, env=env, cwd=cwd)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            out, err = proc.communicate()
            raise ClusterError(f"{node}: {list(cmd)} exceeded {timeout} s:\n{out}{err}") from None
        if check and proc.returncode != 0:
            raise ClusterError(f"{node}: {list(cmd)} exited with {proc.returncode}:\n{out}{err}")
        return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)

    def hostfile(
        self, nodes: Sequence[str] | None = None, slots: int = 1, path: Path | None = None
    ) -> Path:
        """Write an Open MPI hostfile (``nK slots=S`` per node; default every node) to ``path``
        (default ``<root>/hostfile``, visible on every node); returns its path."""
        path = path or self.root / "hostfile"
        path.write_text("".join(f"{self._check(n)} slots={slots}\n" for n in nodes or self.nodes))
        return path

    def pids(self, node: str) -> list[int]:
        """Every live process of the node: in its network or mount namespace (the namespaces
        of its holder, or the network namespace of its name while it is being built)."""
        s = self.state[self._check(node)]
        net = {s.net_ns, _ns_file_inode(self.netns(node))} - {0}
        return _pids_in(net, {s.mnt_ns} - {0}) if net else []

    def listening(self, node: str, port: int) -> bool:
        """Whether a TCP socket on ``node`` listens on ``port`` (read from the node's /proc)."""
        if not self.alive(node):
            return False
        for table in ("tcp", "tcp6"):
            path = Path(f"/proc/{self.state[node].holder}/net/{table}")
            with contextlib.suppress(OSError):
                for row in path.read_text().splitlines()[1:]:
                    local, state = row.split()[1], row.split()[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                        return True
        return False

    # ---- faults ----

    def kill_node(self, node: str, *, silent: bool = False, timeout: float = 10.0) -> None:
        """The node dies: SIGKILL to every process in its network or mount namespace (holder
        included), repeated until none is left. With the last one its mount namespace goes, and
        with it the node's /tmp and /dev/shm; then its link and its namespace's name are removed
        (the network namespace itself may linger in the kernel, unnamed and unlinked, see
        :meth:`_remove_net`). ``silent``: cut the link first, so that no FIN or RST from the
        dying processes reaches the others (a power loss). Returns once all that is done;
        :class:`ClusterError` after ``timeout`` seconds. On a node that is already down it
        removes whatever is left of it."""
        self._check(node)
        (self.root / "holders" / node).unlink(missing_ok=True)  # the agent now fails (255)
        if silent and _link_exists(self.veth(node)):
            self.cut_link(node)
        deadline = time.monotonic() + timeout
        while left := self.pids(node):
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise ClusterError(f"node {node}: processes still alive after {timeout} s: {left}")
            time.sleep(0.005)
        holder = self._holders.pop(node, None)
        if holder is not None:
            holder.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._remove_net(node, deadline)
        (self.root / "cut" / node).unlink(missing_ok=True)
        self.state[node] = NodeState()
        self._save()

    def _remove_net(self, node: str, deadline: float) -> None:
        """Remove the node's link and its namespace's name. The link goes explicitly: the
        kernel frees a namespace (and with it the link) only once the TCP sockets its dead
        processes left behind are gone, minutes later for one still sending its FIN to a peer
        it cannot reach. Such a namespace lingers unnamed, with nothing but ``lo``."""
        veth = self.veth(node)
        while _link_exists(veth):
            _ip("link", "del", veth, check=False)  # fails only if it went meanwhile
            if time.monotonic() > deadline:
                raise ClusterError(f"node {node}: cannot remove its link {veth}")
        if Path("/run/netns", self.netns(node)).exists():
            _ip("netns", "del", self.netns(node))

    def revive(self, node: str, timeout: float = 30.0) -> None:
        """Build a dead node again: same name and address, fresh /tmp and /dev/shm, link up."""
        if self.alive(node):
            raise ClusterError(f"node {node} is up: kill it before reviving it")
        self.kill_node(node)  # whatever is left of it
        self._start_node(node)
        self._wait_node(node, time.monotonic() + timeout)
        self._save()

    def cut_link(self, node: str) -> None:
        """A partition: the node's link goes down; its processes live on, unreachable (and
        the agent fails to reach it, or to reach others from it, with 255)."""
        _ip("link", "set", self.veth(node), "down")
        (self.root / "cut" / node).touch()

    def restore_link(self, node: str) -> None:
        """End the partition of :meth:`cut_link`."""
        _ip("link", "set", self.veth(node), "up")
        (self.root / "cut" / node).unlink(missing_ok=True)

    def link_up(self, node: str) -> bool:
        return not (self.root / "cut" / self._check(node)).exists()

    def ensure_up(self, timeout: float = 30.0) -> None:
        """Every node up with its link up: revive dead nodes, restore cut links."""
        for node in self.nodes:
            if not self.alive(node):
                self.revive(node, timeout)
            elif not self.link_up(node):
                self.restore_link(node)

    # ---- teardown ----

    def stop(self, timeout: float = 30.0) -> None:
        """Kill every node, remove the bridge and the registration (and the directory when
        :meth:`create` made it), then check that no namespace, link or process of the cluster
        is left; :class:`ClusterError` if one is. Safe to call again, and from any process."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            self.kill_node(node, timeout=max(1.0, deadline - time.monotonic()))
        if _link_exists(self.bridge):
            _ip("link", "del", self.bridge)
        left = _names_of(self.prefix)
        if left:
            raise ClusterError(f"cluster {self.prefix}: still there after stop: {left}")
        entry = _registered(self.prefix)
        (REGISTRY / f"{self.prefix}.json").unlink(missing_ok=True)
        if entry.get("own_dir"):
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.root.exists():
            for name in ("holders", "cut"):
                shutil.rmtree(self.root / name, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- registry and leftovers ----


@contextlib.contextmanager
def _registry_lock() -> Iterator[None]:
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _register(prefix: str, owner: int, root: Path, subnet: int, own_dir: bool) -> None:
    entry = {
        "owner": owner,
        "owner_start": _start_time(owner) if owner else 0,
        "root": str(root),
        "subnet": subnet,
        "own_dir": own_dir,
    }
    (REGISTRY / f"{prefix}.json").write_text(json.dumps(entry))


def _registered(prefix: str) -> dict[str, object]:
    try:
        entry: dict[str, object] = json.loads((REGISTRY / f"{prefix}.json").read_text())
        return entry
    except (OSError, ValueError):
        return {}


def clusters() -> dict[str, dict[str, object]]:
    """Every cluster on this machine by prefix: registered ones and unregistered names."""
    found: dict[str, dict[str, object]] = {}
    if REGISTRY.is_dir():
        for path in REGISTRY.glob(f"{FAMILY}*.json"):
            found[path.stem] = _registered(path.stem)
    for name in _all_names():
        if m := NAME_RE.match(name):
            found.setdefault(m.group(1), {})
    for entry in found.values():
        owner = entry.get("owner")
        started = _start_time(owner) if isinstance(owner, int) and owner > 0 else 0
        entry["owner_alive"] = owner == 0 or (started != 0 and started == entry.get("owner_start"))
    return found


def cleanup_leftovers(timeout: float = 30.0) -> list[str]:
    """Remove every cluster whose owner is dead (or that no registration owns): its processes,
    namespaces, links, registration and the directory it made. Returns their prefixes."""
    with _registry_lock():
        return _cleanup_leftovers(timeout)


def _cleanup_leftovers(timeout: float) -> list[str]:
    removed = []
    for prefix, entry in clusters().items():
        if entry["owner_alive"]:
            continue
        deadline = time.monotonic() + timeout
        for name in _names_of(prefix):
            if name.startswith(f"{prefix}-"):  # a namespace: kill what runs there, remove it
                while pids := _netns_pids(name):
                    for pid in pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    if time.monotonic() > deadline:
                        raise ClusterError(f"leftover {name}: processes will not die: {pids}")
                    time.sleep(0.005)
                _ip("netns", "del", name, check=False)
        for name in _names_of(prefix):
            if not name.startswith(f"{prefix}-"):
                _ip("link", "del", name, check=False)
        if entry.get("own_dir") and isinstance(root := entry.get("root"), str):
            shutil.rmtree(root, ignore_errors=True)
        (REGISTRY / f"{prefix}.json").unlink(missing_ok=True)
        removed.append(prefix)
    return removed


def _new_identity() -> tuple[str, int]:
    """A prefix no cluster uses and a subnet number no live cluster uses (registry locked)."""
    taken = clusters()
    used = {e.get("subnet") for e in taken.values()}
    free = [x for x in range(256) if x not in used]
    if not free:
        raise ClusterError("every 10.211.X.0/24 subnet is in use by a cluster")
    while (prefix := FAMILY + secrets.token_hex(2)) in taken:
        pass
    return prefix, secrets.choice(free)


def _all_names() -> list[str]:
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    return [*netns, *os.listdir("/sys/class/net")]


def _names_of(prefix: str) -> list[str]:
    return [n for n in _all_names() if (m := NAME_RE.match(n)) and m.group(1) == prefix]


# ---- small helpers ----


def _ip(*args: str, check: bool = True) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise ClusterError(f"ip {' '.join(args)}: {res.stderr.strip()}")


def _no_ipv6(dev: str) -> None:
    """No IPv6 (link-local) address on a host-side device: the host stays unreachable."""
    path = Path(f"/proc/sys/net/ipv6/conf/{dev}/disable_ipv6")
    if path.exists():
        path.write_text("1")


def _link_exists(dev: str) -> bool:
    return os.path.lexists(f"/sys/class/net/{dev}")


def _cgroup_mounts() -> list[str]:
    """Shell lines mounting the host's cgroup hierarchies again under a fresh /sys (failures are
    logged, not fatal: only slurmd needs them)."""
    lines = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, target, fstype, opts = line.split()[:4]
        if target == "/sys/fs/cgroup" and fstype == "tmpfs":
            lines.append("mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup")
        elif fstype in ("cgroup", "cgroup2") and target.startswith("/sys/fs/cgroup"):
            keep = ",".join(o for o in opts.split(",") if o not in ("rw", "ro", "relatime"))
            option = f" -o {keep}" if keep else ""
            lines.append(
                f"mkdir -p {target} && mount -t {fstype}{option} {fstype} {target}"
                f" || echo 'cannot mount {target}' >&2"
            )
    return lines


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ns_inode(pid: int, kind: str) -> int:
    """The inode of the process's namespace of ``kind``; 0 once it has exited (zombies too)."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return 0


def _pids_in(net: set[int], mnt: set[int]) -> list[int]:
    """Live processes in one of the network namespaces ``net`` or mount namespaces ``mnt``."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            pid = int(entry.name)
            if _ns_inode(pid, "net") in net or _ns_inode(pid, "mnt") in mnt:
                pids.append(pid)
    return pids


def _ns_file_inode(netns: str) -> int:
    """The inode of a named network namespace (``ip netns``); 0 if there is none."""
    try:
        return os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return 0


def _netns_pids(name: str) -> list[int]:
    inode = _ns_file_inode(name)
    return _pids_in({inode}, set()) if inode else []


def _start_time(pid: int) -> int:
    """The process's start time (clock ticks after boot); 0 if it does not exist."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


# ---- CLI ----


def _usage(cluster: Cluster) -> str:
    me = f"python -m tests.multinode.cluster {{}} --dir {cluster.root}"
    agent = " ".join(f"{k}={v}" for k, v in cluster.mpi_env.items())
    mpirun = Path(sys.executable).parent / "mpirun"
    return f"""\
cluster {cluster.prefix}: nodes {", ".join(cluster.nodes)} on 10.211.{cluster.subnet}.0/24
  directory, the same path on every node: {cluster.root} (shared files: {cluster.shared})
  hostfile:        {cluster.hostfile()}
  ssh agent:       export {agent}
  shell on n1:     {me.format("run n1")} -- bash
  a command on n2: {cluster.agent} n2 hostname    (as ssh n2 hostname)
  mpirun from n1:  {me.format("run n1")} -- env {agent} \\
                     {mpirun} --allow-run-as-root --with-ft ulfm --hostfile \\
                     {cluster.root}/hostfile --map-by node:oversubscribe -np 3 hostname
  faults:          {me.format("kill-node|revive|cut-link|restore-link n2")}
  remove:          {me.format("down")}"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.multinode.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="build a cluster (it stays until `down`)")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--dir", type=Path, required=True)
    for action in ("down", "kill-node", "revive", "cut-link", "restore-link", "run"):
        p = sub.add_parser(action)
        if action not in ("down",):
            p.add_argument("node")
        p.add_argument("--dir", type=Path, required=True)
    sub.add_parser("list", help="every cluster on this machine")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # run NODE --dir DIR -- CMD...
    args, cmd = parser.parse_args(argv[:cut]), argv[cut + 1 :]
    if os.geteuid() != 0:
        parser.error("namespaces need root")
    if args.action == "list":
        for prefix, entry in sorted(clusters().items()):
            print(prefix, json.dumps(entry))
        return 0
    if args.action == "up":
        t0 = time.monotonic()
        cluster = Cluster.create(args.nodes, args.dir, owner=0)
        print(f"built in {time.monotonic() - t0:.2f} s\n{_usage(cluster)}")
        return 0
    cluster = Cluster.attach(args.dir)
    if args.action == "down":
        cluster.stop()
    elif args.action == "kill-node":
        cluster.kill_node(args.node)
    elif args.action == "revive":
        cluster.revive(args.node)
    elif args.action == "cut-link":
        cluster.cut_link(args.node)
    elif args.action == "restore-link":
        cluster.restore_link(args.node)
    elif args.action == "run":
        env = {k: os.environ[k] for k in ("TERM",) if k in os.environ}
        try:
            return subprocess.call(cluster.command(args.node, cmd or ["bash"], env=env))
        except OSError as exc:
            return 127 if exc.errno == errno.ENOENT else 126
    return 0


if __name__ == "__main__":
    sys.exit(main())
