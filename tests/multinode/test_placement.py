"""Placement across the nodes of a 3-node cluster: every chain's replicas on distinct nodes (as
``--map-by node`` lays the ranks out, and dealt onto the chains when ``--map-by slot`` fills one
node first), a killed server's replacement spawned on a live node holding no other member of
its chain or on the spare node, and every run bit-exact against the same run without the kill
on one machine."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ftmpi.events import read_events
from ftmpi.membership import SPAWN_ATTEMPTS
from tests.conftest import MPIRUN, PROGS, ROOT, run_command
from tests.multinode.cluster import Cluster

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(300)]

PROG = str(PROGS / "ft_train.py")
STEPS = 60

RUNTIME_CRASHES = (
    "PRTE has lost communication with a remote daemon",
    "free(): ",
    "corrupted size vs. prev_size",
    "double free or corruption",
)
"""What Open MPI 5.0's runtime (PRRTE 3.0) prints when a daemon or mpirun itself dies of heap
corruption after a re-spawn across nodes (measured here in about half the runs that spawn with
the Info key ``host``, and in some without it; open-mpi/ompi#12599, #13427). Training is then
cut short (a lost daemon ends the job) or, when mpirun dies at its exit, already done."""


@dataclass(frozen=True)
class Layout:
    """A job on the cluster: its hostfile's slots per node, Open MPI's mapping, its ranks."""

    slots: dict[str, int]
    mapping: str
    servers: int
    chain_length: int
    spare: str = ""

    @property
    def ranks(self) -> int:
        return 2 + self.servers  # two workers

    @property
    def env(self) -> dict[str, str]:
        env = {
            "FTMPI_SERVERS": str(self.servers),
            "FTMPI_STRATEGY": "chain",
            "FTMPI_CHAIN_LENGTH": str(self.chain_length),
            "FTMPI_BACKEND": "mpi",
            "FTMPI_TIMEOUT": "120",
            "FTMPI_START_TIMEOUT": "30",  # a replacement that never comes up: spawned again
        }
        return {**env, "FTMPI_SPARE_NODES": self.spare} if self.spare else env


def run_on_cluster(cluster: Cluster, layout: Layout, run_dir: Path, kill: str) -> list[dict]:
    """``ft_train.py`` launched from n1 across the cluster; the workers' reports."""
    hostfile = run_dir.parent / f"{run_dir.name}.hosts"
    hostfile.write_text("".join(f"{n} slots={k}\n" for n, k in layout.slots.items()))
    env = {**layout.env, "FTMPI_RUN_DIR": str(run_dir), "FTMPI_KILL": kill}
    cmd = [
        *(str(MPIRUN), "--allow-run-as-root", "--with-ft", "ulfm", "--hostfile", str(hostfile)),
        *("--map-by", f"{layout.mapping}:oversubscribe", "-np", str(layout.ranks)),
        *(arg for k, v in {**env, "OMP_NUM_THREADS": "1"}.items() for arg in ("-x", f"{k}={v}")),
        *(sys.executable, PROG, str(STEPS), "--await-replacements"),
    ]
    launch_env = {**cluster.mpi_env, "PYTHONUNBUFFERED": "1"}
    # exit_hang_after: a job that hangs in MPI_Finalize after the re-spawn, once both workers
    # reported, is Open MPI's documented exit hang (docs/recovery.md); its results are checked
    res = run_command(
        cluster.command("n1", cmd, env=launch_env, cwd=ROOT), timeout=240, exit_hang_after=2
    )
    reports = sorted(res.json_lines(), key=lambda r: r["worker"])
    if res.returncode in (0, -9) and len(reports) == 2:
        return reports
    crash = next((s for s in RUNTIME_CRASHES if s in res.stderr), None)
    if crash is not None and len(reports) != 2:
        pytest.xfail(f"Open MPI's runtime crashed around the re-spawn: {crash!r}")
    # plain mpirun's status after a rank's death is Open MPI's, not the run's (docs/recovery.md,
    # Open MPI's behaviour): with every report in, the run's record says whether it finished
    said = f"mpirun exited {res.returncode}\n" + res.stdout[-2000:] + res.stderr[-3000:]
    assert len(reports) == 2, said
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and not (run_dir / "fatal.json").exists(), said
    return reports


def reference_weights(mpi, layout: Layout, run_dir: Path) -> str:
    """The weights of the same run without the kill, on this machine."""
    res = mpi(
        layout.ranks,
        [PROG, str(STEPS), "--await-replacements"],
        env={**layout.env, "FTMPI_RUN_DIR": str(run_dir)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return {r["weights"] for r in res.json_lines()}.pop()


def placed(run_dir: Path) -> tuple[set, set, list]:
    """The nodes the run's events name: chosen (``spawn_started``), run on
    (``replacement_ready``), joined from (``replacement_joined``)."""
    events = read_events(str(run_dir))
    chosen = {e["nodes"] and tuple(e["nodes"]) for e in events if e["event"] == "spawn_started"}
    ready = {tuple(e["nodes"]) for e in events if e["event"] == "replacement_ready"}
    joined = [e["node"] for e in events if e["event"] == "replacement_joined"]
    return chosen, ready, joined


def never_came_up(run_dir: Path, spare: str) -> None:
    """Expected failure where no replacement ever came up on the spare: Open MPI's start-up
    exchange blocked every spawn there (docs/recovery.md, known limitations); ftmpi dropped
    each after ``FTMPI_START_TIMEOUT`` and trained on with the slot down (already checked)."""
    events = read_events(str(run_dir))
    failed = [e for e in events if e["event"] == "spawn_failed"]
    if not failed or any(e["event"] == "replacement_ready" for e in events):
        return
    assert spare and [e["nodes"] for e in failed] == [[spare]] * SPAWN_ATTEMPTS, failed
    pytest.xfail(f"Open MPI never started a replacement on the spare {spare}: {failed[-1]}")


@dataclass(frozen=True)
class Case:
    layout: Layout
    kill: str
    rank_nodes: list[str]
    """Each world rank's node, as Open MPI maps them."""
    chains: list[list[int]]
    target: str
    """The node the killed server's replacement goes to."""


CASES = {
    # rank r on node r % 3: servers 0, 1, 2 on n3, n1, n2; server 1 dies and n1 (its workers
    # live on) is the only node holding no other member of the chain
    "map-by-node": Case(
        Layout({"n1": 2, "n2": 2, "n3": 2}, "node", servers=3, chain_length=3),
        "server:1@step=37",
        ["n1", "n2", "n3", "n1", "n2"],
        [[0, 1, 2]],
        "n1",
    ),
    # n1 filled first: servers 0, 1 on n1, 2, 3 on n2, 4, 5 on n3, dealt onto chains [0, 2, 4]
    # and [1, 3, 5]; server 2 (on n2) dies and, with no spare, Open MPI spawns its replacement
    # on the launch node n1 (docs/recovery.md, placement)
    "map-by-slot": Case(
        Layout({"n1": 4, "n2": 2, "n3": 2}, "slot", servers=6, chain_length=3),
        "server:2@step=37",
        ["n1"] * 4 + ["n2"] * 2 + ["n3"] * 2,
        [[0, 2, 4], [1, 3, 5]],
        "n1",
    ),
    # n3 listed with no rank mapped to it: the spare takes server 0's replacement
    "spare": Case(
        Layout({"n1": 3, "n2": 1, "n3": 2}, "slot", servers=2, chain_length=2, spare="n3"),
        "server:0@step=37",
        ["n1", "n1", "n1", "n2"],
        [[0, 1]],
        "n3",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_chains_span_nodes_and_a_replacement_lands_on_a_live_node(cluster, mpi, name):
    case, layout = CASES[name], CASES[name].layout
    run_dir = cluster.shared / f"placement-{name}"
    got = run_on_cluster(cluster, layout, run_dir, case.kill)
    want = reference_weights(mpi, layout, cluster.shared / f"placement-{name}-ref")
    assert got[0]["weights"] == got[1]["weights"] == want
    assert got[0]["versions"] == [STEPS] * len(case.chains)
    recorded = json.loads((run_dir / "manifest.json").read_text())["layout"]
    roles = ["worker 0", "worker 1", *(f"server {s}" for s in range(layout.servers))]
    assert [(r["role"], r["node"]) for r in recorded["ranks"]] == list(
        zip(roles, case.rank_nodes, strict=True)
    )
    slot_nodes = case.rank_nodes[2:]
    assert recorded["chains"] == case.chains
    assert recorded["chain_nodes"] == [[slot_nodes[s] for s in c] for c in case.chains]
    assert all(len(set(nodes)) == layout.chain_length for nodes in recorded["chain_nodes"])
    assert recorded["spare_nodes"] == ([layout.spare] if layout.spare else [])
    never_came_up(run_dir, layout.spare)
    target = case.target
    chosen = {(target,)} if layout.spare else {None}  # placed by name only onto spares
    assert placed(run_dir) == (chosen, {(target,)}, [target])
