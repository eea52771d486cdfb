"""The nodes a multi-node job runs on, and which of them the next attempt may use.

A job given ``--hostfile FILE`` (or ``-H n1:2,n2:2``, or run by ``mpirun`` inside a Slurm
allocation: its nodes) runs its ranks on the listed nodes except
the **spares** (``--spare-nodes``): a spare holds no rank at the start; it is where a replacement
goes (``FTMPI_SPARE_NODES``, ``ftmpi.placement``) and where a relaunch puts the ranks of a lost
node. Open MPI 5 ends the whole job when it loses a node's daemon (``launch.outcome``:
``NODE_LOST``); the launcher then marks lost the nodes that no longer answer when reached
the way ``mpirun`` reaches them (``PRTE_MCA_plm_ssh_agent``; in a Slurm allocation, a job step;
else ssh), and relaunches on the others, from a hostfile in the run directory that names only
usable nodes (``hostfile.<k>`` once ``k`` nodes are lost; with spares held back, a
``rankfile.<k>`` keeps them free of initial ranks), a spare taking a lost node's place. A lost
node is never used again in this run.

A chain's servers keep their shard in node-local memory (``FTMPI_NODE_COPY_DIR``, under
``/dev/shm``); before a relaunch the launcher gathers what the surviving nodes hold into the run
directory (:func:`gather_node_copies`), where the relaunched servers restore from it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from launch.proctree import kill_tree

PROBE_TIMEOUT = 5.0
"""Seconds a node has to answer the launcher's probe (``AGENT NODE true``)."""
GATHER_TIMEOUT = 300.0
"""Seconds a node has to hand over its node copies before the relaunch goes on without them."""


class NodeError(ValueError):
    """A hostfile, host list or spare list that cannot be used; the message names the fix."""


@dataclass(frozen=True)
class Node:
    name: str
    slots: int


def parse_hostfile(path: str) -> list[Node]:
    """The nodes of an Open MPI hostfile (``NAME [slots=N] ...`` per line, ``#`` comments).
    Raises :class:`NodeError` for a missing file, a bad slot count, a repeated or no node."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise NodeError(f"--hostfile {path}: cannot read it ({exc.strerror})") from None
    nodes = []
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        slots = 1
        for word in words[1:]:
            key, _, value = word.partition("=")
            if key == "slots":
                if not value.isdigit() or int(value) < 1:
                    raise NodeError(
                        f"--hostfile {path} line {number}: {word!r} is not a slot count; "
                        "write slots=N with N >= 1"
                    )
                slots = int(value)
        nodes.append(Node(words[0], slots))
    return _checked(nodes, f"--hostfile {path}")


def parse_hosts(hosts: str) -> list[Node]:
    """The nodes of a host list ``n1:2,n2:2`` (``-H``); a node without ``:N`` has one slot."""
    nodes = []
    for item in filter(None, hosts.split(",")):
        name, _, slots = item.partition(":")
        if slots and (not slots.isdigit() or int(slots) < 1):
            raise NodeError(f"-H {hosts}: {item!r} has no valid slot count; write NAME:N, N >= 1")
        nodes.append(Node(name, int(slots or 1)))
    return _checked(nodes, f"-H {hosts}")


def slurm_nodes(environ: Mapping[str, str]) -> list[Node] | None:
    """The nodes of the Slurm allocation ``mpirun`` runs in (``SLURM_JOB_NODELIST``, expanded
    by ``scontrol show hostnames``; slots from ``SLURM_TASKS_PER_NODE``), or None outside
    one. Raises :class:`NodeError` when the allocation cannot be read."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        done = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            env=dict(environ),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NodeError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist} with scontrol: {exc}"
        ) from None
    names = done.stdout.split()
    if done.returncode != 0 or not names:
        raise NodeError(
            f"scontrol show hostnames {nodelist} failed ({done.stderr.strip()}); run inside a "
            "Slurm allocation or pass --hostfile"
        )
    slots = tasks_per_node(environ.get("SLURM_TASKS_PER_NODE", ""), len(names))
    return _checked([Node(n, k) for n, k in zip(names, slots, strict=True)], "the allocation")


def tasks_per_node(spec: str, nodes: int) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) as one count per node; one each when it is
    missing or does not match the node count."""
    counts: list[int] = []
    for item in filter(None, spec.split(",")):
        number, _, repeat = item.partition("(x")
        if not number.isdigit() or (repeat and not repeat.rstrip(")").isdigit()):
            return [1] * nodes
        counts += [int(number)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts if len(counts) == nodes else [1] * nodes


def _checked(nodes: list[Node], where: str) -> list[Node]:
    if not nodes:
        raise NodeError(f"{where} names no node")
    names = [n.name for n in nodes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise NodeError(f"{where} names {repeated} more than once; list each node once")
    return nodes


@dataclass
class NodePlan:
    """Where each attempt of the job may run: the listed nodes, minus the spares, minus the
    nodes lost so far, a spare taking each lost node's place while there is one."""

    nodes: list[Node]
    spares: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        unknown = [s for s in self.spares if s not in names]
        if unknown:
            raise NodeError(
                f"--spare-nodes {','.join(self.spares)}: {unknown} not in the hostfile/host "
                "list; a spare must be listed there too (Open MPI spawns only onto known nodes)"
            )
        if len(self.spares) >= len(self.nodes):
            raise NodeError(
                f"--spare-nodes {','.join(self.spares)}: every node is a spare; leave at least "
                "one node for the job's ranks"
            )

    @property
    def usable(self) -> list[Node]:
        return [n for n in self.nodes if n.name not in self.lost]

    @property
    def free_spares(self) -> list[str]:
        """Spares still held back: each lost node that held ranks used one up, in order."""
        spares = [s for s in self.spares if s not in self.lost]
        used = len([n for n in self.lost if n not in self.spares])
        return spares[used:]

    @property
    def ranked(self) -> list[Node]:
        """The nodes the next attempt's initial ranks go on (hostfile order)."""
        return [n for n in self.usable if n.name not in self.free_spares]

    def lose(self, names: Sequence[str]) -> list[str]:
        """Mark ``names`` lost (unknown names are ignored); returns the newly lost ones."""
        listed = {n.name for n in self.nodes}
        new = [n for n in dict.fromkeys(names) if n in listed and n not in self.lost]
        self.lost += new
        return new

    def hostfile_text(self) -> str:
        """The next attempt's hostfile: every usable node, the free spares included (Open MPI
        spawns only onto nodes it was given)."""
        return "".join(f"{n.name} slots={n.slots}\n" for n in self.usable)

    def rankfile_text(self, nprocs: int) -> str:
        """An Open MPI rankfile putting ``nprocs`` initial ranks round-robin over the ranked
        nodes (slot ``k`` for a node's ``k``-th rank, cycling over its slots), so the free
        spares start with no rank."""
        ranked = self.ranked
        lines = []
        for r in range(nprocs):
            node = ranked[r % len(ranked)]
            lines.append(f"rank {r}={node.name} slot={(r // len(ranked)) % node.slots}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, object]:
        return {
            "nodes": [n.name for n in self.nodes],
            "spares": self.spares,
            "lost": self.lost,
            "ranked": [n.name for n in self.ranked],
        }


def remote_command(node: str, command: str, environ: Mapping[str, str]) -> list[str]:
    """The argv that runs the shell ``command`` on ``node`` the way ``mpirun`` reaches it: its
    ssh agent (``PRTE_MCA_plm_ssh_agent``, words; the agent's remote shell runs the line), or
    inside a Slurm allocation a job step on that node (``srun --overlap``), else
    non-interactive ssh with a connect timeout."""
    agent = environ.get("PRTE_MCA_plm_ssh_agent") or environ.get("OMPI_MCA_plm_ssh_agent")
    if agent:
        return [*shlex.split(agent), node, command]
    if environ.get("SLURM_JOB_ID"):
        return ["srun", "--overlap", "-N1", "-n1", "-w", node, "sh", "-c", command]
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(PROBE_TIMEOUT)}"]
    return [*ssh, node, command]


def on_nodes(
    names: Sequence[str],
    command: str | Callable[[str], str],
    environ: Mapping[str, str],
    timeout: float,
) -> list[bool]:
    """Run the shell ``command`` (or ``command(node)``) on every node of ``names`` at once
    (:func:`remote_command`); per node, whether it exited 0 within ``timeout`` seconds (a
    command still running then is killed with everything it started)."""

    def ok(name: str) -> bool:
        line = command(name) if callable(command) else command
        try:
            proc = subprocess.Popen(
                remote_command(name, line, environ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=dict(environ),
                start_new_session=True,
            )
        except OSError:
            return False
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            return False

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(names))) as pool:
        return list(pool.map(ok, names))


def unreachable(
    names: Sequence[str], environ: Mapping[str, str], timeout: float = PROBE_TIMEOUT
) -> list[str]:
    """Of ``names``, the nodes that do not run ``true`` (:func:`remote_command`) within
    ``timeout`` seconds (all probed at once; never waits much longer than ``timeout``)."""
    answered = on_nodes(names, "true", environ, timeout)
    return [n for n, up in zip(names, answered, strict=True) if not up]


def gather_node_copies(
    names: Sequence[str],
    source: str,
    dest: str,
    environ: Mapping[str, str],
    timeout: float = GATHER_TIMEOUT,
) -> list[str]:
    """Copy each node's ``source`` directory (its node copies) to ``dest/<node>/`` (on the
    shared filesystem), replacing what an earlier gathering left; returns the nodes that
    held copies and handed them over."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest, exist_ok=True)
    src = shlex.quote(source)

    def copy(node: str) -> str:
        dst = shlex.quote(os.path.join(dest, node))
        return f"test -d {src} || exit 3; mkdir -p {dst} && cp -R {src}/. {dst}/"

    copied = on_nodes(names, copy, environ, timeout)
    return [n for n, ok in zip(names, copied, strict=True) if ok]


def write_placement(plan: NodePlan, nprocs: int, run_dir: str, k: int) -> tuple[str, str | None]:
    """Write the ``k``-th hostfile (``hostfile.<k>``) into ``run_dir`` and, when spares are
    held back, the rankfile that keeps them free (``rankfile.<k>``); returns their paths."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    hostfile = os.path.join(run_dir, f"hostfile.{k}")
    Path(hostfile).write_text(plan.hostfile_text())
    if not plan.free_spares:
        return hostfile, None
    rankfile = os.path.join(run_dir, f"rankfile.{k}")
    Path(rankfile).write_text(plan.rankfile_text(nprocs))
    return hostfile, rankfile
