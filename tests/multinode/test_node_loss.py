"""Losing a whole node (its daemon, its ranks, its memory and node-local disk) in a 3-node job
with a tail-ack chain of 3: Open MPI ends the whole job; ftmpi-run names the lost node, gathers
the chain's node copies from the surviving nodes, relaunches on them, and the run ends with exit
status 0 and the weights of the same run without the failure. Launched as ``ftmpi-run
--hostfile FILE --max-restarts 2`` with the ssh agent in ``PRTE_MCA_plm_ssh_agent``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from launch.proctree import kill_tree
from tests.conftest import PROGS, ROOT, run_mpi
from tests.multinode.cluster import Cluster

pytestmark = pytest.mark.multinode

VENV = Path(sys.executable).parent
PROG = str(PROGS / "ft_train.py")
STEPS = 150
ARGS = [str(STEPS), "--step-sleep", "0.05"]
ENV = {"FTMPI_BACKEND": "mpi", "FTMPI_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
KILLED_AT = 20
"""The node is killed once a surviving node holds a node copy of this version (mid-run)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The weights of the same job (2 workers, a chain of 3) on one host, without a failure."""
    run_dir = tmp_path_factory.mktemp("ref")
    env = {**ENV, "FTMPI_SERVERS": "3", "FTMPI_STRATEGY": "chain", "FTMPI_RUN_DIR": str(run_dir)}
    res = run_mpi(5, [PROG, *ARGS], env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return str(json.loads((run_dir / "summary.json").read_text())["weights_sha256"])


def newest_node_copy(cluster: Cluster, nodes: list[str], run_id: str) -> int:
    """The newest shard version in run ``run_id``'s node copies on ``nodes`` (another run's
    copies never count)."""
    newest = 0
    for node in nodes:
        where = f"/dev/shm/ftmpi-{run_id}/slot*/"
        listing = cluster.run_on(node, ["sh", "-c", f"ls {where}"], check=False)
        for word in listing.stdout.split():
            if word.endswith(".ftck"):
                newest = max(newest, int(word.split("-v")[1].split(".")[0]))
    return newest


def kill_mid_run(cluster: Cluster, victim: str, running, run_id: str) -> float:
    """Kill ``victim`` once a surviving node holds a node copy of :data:`KILLED_AT` (within
    180 s, while ``running()``); returns the wall time of the death."""
    survivors = [n for n in cluster.nodes if n != victim]
    deadline = time.monotonic() + 180
    while newest_node_copy(cluster, survivors, run_id) < KILLED_AT:
        assert running(), "the job ended before the node was killed"
        assert time.monotonic() < deadline, f"no node copy of version {KILLED_AT} in 180 s"
        time.sleep(0.2)
    cluster.kill_node(victim)  # daemon, ranks, /dev/shm and /tmp gone
    return time.time()


def check_resumed(cluster: Cluster, run_dir: Path, want: str) -> dict:
    """The run finished with ``want``'s weights after resuming from a gathered node copy, and
    no surviving node keeps its node copies."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    restored = [e for e in events if e["event"] == "restored"]
    assert restored and "/node-copies/" in restored[0]["path"], restored
    assert restored[0]["version"] >= KILLED_AT, "resumed from the node copies, not step 0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == STEPS
    assert summary["weights_sha256"] == want
    for node in ("n1", "n2"):
        left = cluster.run_on(node, ["sh", "-c", "ls -d /dev/shm/ftmpi-* || true"])
        assert summary["run_id"] not in left.stdout, f"{node} keeps {left.stdout}"
    return {"version": restored[0]["version"], "events": events}


def test_ftmpi_run_survives_a_lost_node_from_the_chains_node_copies(cluster, reference):
    run_dir = cluster.shared / "lossy"
    cmd = [
        *(str(VENV / "ftmpi-run"), "-np", "2", "--servers", "3", "--strategy", "chain"),
        *("--chain-ack", "tail", "--hostfile", str(cluster.hostfile(slots=2))),
        *("--max-restarts", "2", "--run-dir", str(run_dir), "--", str(VENV / "python"), PROG),
        *ARGS,
    ]
    env = {**ENV, **cluster.mpi_env, "FTMPI_RUN_ID": "lossy"}
    job = cluster.start_on("n1", cmd, env=env, cwd=ROOT)
    try:
        died = kill_mid_run(cluster, "n3", lambda: job.poll() is None, "lossy")
        out, err = job.communicate(timeout=300)
    finally:
        kill_tree(job.pid)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    assert "node n3 was lost" in out and "the relaunch runs on n1, n2" in out, out[-3000:]
    launcher = json.loads((run_dir / "launcher.json").read_text())
    first, second = launcher["attempts"]
    assert first["status"] == 4 and first["lost_nodes"] == ["n3"]
    assert second["status"] == 0 and "n3" not in (run_dir / "hostfile.1").read_text()
    got = check_resumed(cluster, run_dir, reference)
    resumed = min(e["time"] for e in got["events"] if e["event"] == "resumed")
    print(f"node death -> training resumed {resumed - died:.1f} s, from version {got['version']}")


def test_a_cut_link_is_noticed_in_seconds_and_survived_like_a_lost_node(cluster, reference):
    run_dir = cluster.shared / "partition"
    cmd = [
        *(str(VENV / "ftmpi-run"), "-np", "2", "--servers", "3", "--strategy", "chain"),
        *("--hostfile", str(cluster.hostfile(slots=2))),
        *("--max-restarts", "2", "--run-dir", str(run_dir), "--", str(VENV / "python"), PROG),
        *ARGS,
    ]
    env = {**ENV, **cluster.mpi_env, "FTMPI_RUN_ID": "partition"}
    job = cluster.start_on("n1", cmd, env=env, cwd=ROOT)
    try:
        survivors = ["n1", "n2"]
        deadline = time.monotonic() + 180
        while newest_node_copy(cluster, survivors, "partition") < KILLED_AT:
            assert job.poll() is None and time.monotonic() < deadline, "no progress"
            time.sleep(0.2)
        cluster.cut_link("n3")  # its processes live on, unreachable
        cut = time.time()
        out, err = job.communicate(timeout=300)
    finally:
        kill_tree(job.pid)
        cluster.kill_node("n3")  # the cut-off ranks of the first attempt
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    first = json.loads((run_dir / "launcher.json").read_text())["attempts"][0]
    assert first["status"] == 4 and first["lost_nodes"] == ["n3"], first
    noticed = first["ended"] - cut
    assert noticed < 10, f"the cut was noticed after {noticed:.1f} s"
    check_resumed(cluster, run_dir, reference)
    print(f"cut link noticed and the job ended {noticed:.1f} s after the cut")
