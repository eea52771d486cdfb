"""Losing a whole node (its daemon, its ranks, its memory and node-local disk) in a 3-node job
launched as ``ftmpi-run --hostfile FILE --max-restarts 2`` with a tail-ack chain of 3: Open MPI
ends the whole job; ftmpi-run names the lost node, gathers the chain's node copies from the
surviving nodes, relaunches on them and the run ends with exit status 0 and the weights of the
same run without the failure."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from launch.proctree import kill_tree
from tests.conftest import PROGS
from tests.multinode.cluster import Cluster

pytestmark = pytest.mark.multinode

VENV = Path(sys.executable).parent
PROG = str(PROGS / "ft_train.py")
STEPS = 150
CONFIG = ["-np", "2", "--servers", "3", "--strategy", "chain", "--chain-ack", "tail"]
ENV = {"FTMPI_BACKEND": "mpi", "FTMPI_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


def newest_node_copy(cluster: Cluster, nodes: list[str]) -> int:
    """The newest shard version in the node copies (``/dev/shm/ftmpi-*``) of ``nodes``."""
    newest = 0
    for node in nodes:
        listing = cluster.run_on(node, ["sh", "-c", "ls /dev/shm/ftmpi-*/slot*/"], check=False)
        for word in listing.stdout.split():
            if word.endswith(".ftck"):
                newest = max(newest, int(word.split("-v")[1].split(".")[0]))
    return newest


def _ftmpi_run(cluster: Cluster, run_dir: Path, *extra: str) -> list[str]:
    return [
        str(VENV / "ftmpi-run"),
        *CONFIG,
        "--hostfile",
        str(cluster.hostfile(slots=2)),
        "--run-dir",
        str(run_dir),
        *extra,
        "--",
        str(VENV / "python"),
        PROG,
        str(STEPS),
        "--step-sleep",
        "0.05",
    ]


def test_a_lost_node_is_survived_by_a_relaunch_from_the_chains_node_copies(cluster, mpi):
    ref_dir = cluster.shared / "ref"
    ref = mpi(
        5,
        [PROG, str(STEPS)],
        env={
            **ENV,
            "FTMPI_SERVERS": "3",
            "FTMPI_STRATEGY": "chain",
            "FTMPI_RUN_DIR": str(ref_dir),
        },
        timeout=180,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = json.loads((ref_dir / "summary.json").read_text())["weights_sha256"]

    run_dir = cluster.shared / "lossy"
    job = cluster.start_on(
        "n1",
        _ftmpi_run(cluster, run_dir, "--max-restarts", "2"),
        env={**ENV, **cluster.mpi_env},
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 180
        while newest_node_copy(cluster, ["n1", "n2"]) < 20:  # mid-run, with state to resume
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "no node copy of version 20 within 180 s"
            time.sleep(0.2)
        cluster.kill_node("n3")  # a server's node: daemon, ranks, /dev/shm and /tmp gone
        died = time.time()
        out, err = job.communicate(timeout=300)
    finally:
        kill_tree(job.pid)
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    assert "node n3 was lost" in out and "the relaunch runs on n1, n2" in out, out[-3000:]

    launcher = json.loads((run_dir / "launcher.json").read_text())
    first, second = launcher["attempts"]
    assert first["status"] == 4 and first["lost_nodes"] == ["n3"]
    assert second["status"] == 0 and "n3" not in Path(run_dir / "hostfile.1").read_text()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    restored = [e for e in events if e["event"] == "restored"]
    assert restored and "/node-copies/" in restored[0]["path"], restored
    assert restored[0]["version"] >= 20, "the relaunch resumed from the node copies, not step 0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == STEPS
    assert summary["weights_sha256"] == want
    resumed = min(e["time"] for e in events if e["event"] == "resumed")
    print(
        f"node death -> training resumed: {resumed - died:.1f} s; "
        f"resumed at version {restored[0]['version']}"
    )
