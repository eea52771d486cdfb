"""A chain's state outlives a job that ended all at once (as Open MPI ends one when it loses a
node): every server keeps its shard's newest versions in node-local memory
(``FTMPI_NODE_COPY_DIR``); the relaunch restores the chain from the copies gathered into the
run directory, every worker resumes at that version, and the weights are those of the run
without the failure."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ftmpi.config import NODE_COPIES
from ftmpi.events import read_events
from ftmpi.snapshot import list_versions
from launch.proctree import kill_tree
from tests.conftest import mpi_command, start_command
from tests.mpi.common import PROG

pytestmark = pytest.mark.mpi

STEPS = 60
ENV = {
    "FTMPI_SERVERS": "3",
    "FTMPI_STRATEGY": "chain",
    "FTMPI_CHAIN_LENGTH": "3",
    "FTMPI_BACKEND": "mpi",
    "FTMPI_TIMEOUT": "60",
    "FTMPI_RUN_ID": "nodecopy",
}


def _finish(mpi, run_dir: Path, env: dict[str, str]) -> tuple[dict, str]:
    res = mpi(5, [PROG, str(STEPS)], env={**ENV, "FTMPI_RUN_DIR": str(run_dir), **env}, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["steps"] == STEPS, summary
    return summary, res.stderr


def test_a_chain_resumes_from_its_node_copies_bit_exact(mpi, tmp_path):
    ref, _ = _finish(mpi, tmp_path / "ref", {})

    run_dir, shm = tmp_path / "run", tmp_path / "shm"
    env = {**ENV, "FTMPI_RUN_DIR": str(run_dir), "FTMPI_NODE_COPY_DIR": str(shm)}
    job = start_command(mpi_command(5, [PROG, str(STEPS), "--step-sleep", "0.05"]), env=env)
    try:
        deadline = time.monotonic() + 90
        while max(list_versions(shm / "slot0", 0), default=0) < 20:
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no node copy of version 20 within 90 s"
            time.sleep(0.05)
    finally:
        kill_tree(job.pid)  # every process of the job at once, as the runtime does
        job.communicate()
    assert not (run_dir / "summary.json").exists()
    copies = {slot: list_versions(shm / f"slot{slot}", 0) for slot in range(3)}
    assert all(1 <= len(v) <= 2 for v in copies.values()), copies  # the newest two, no more

    shutil.copytree(shm, run_dir / NODE_COPIES / "node1")  # what ftmpi-run gathers
    again, stderr = _finish(mpi, run_dir, {"FTMPI_NODE_COPY_DIR": str(shm), "FTMPI_RESUME": "1"})
    restored = [e for e in read_events(run_dir) if e.get("event") == "restored"]
    assert restored and all(NODE_COPIES in e["path"] for e in restored), restored
    version = restored[0]["version"]
    assert version >= 20 and f"resumed from the snapshot at step {version}" in stderr
    assert again["weights_sha256"] == ref["weights_sha256"]
    assert not any(shm.glob("slot*")), "a finished run's node copies are discarded"
