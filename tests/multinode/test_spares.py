"""A spare node (``ftmpi-run --spare-nodes``) starts with no rank and takes a dead server's
replacement: ``ftmpi-run`` keeps it out of the initial mapping with a rankfile while listing it
in the hostfile, so Open MPI can spawn onto it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.proctree import kill_tree
from tests.conftest import PROGS, ROOT
from tests.multinode.test_placement import never_came_up

pytestmark = pytest.mark.multinode

VENV = Path(sys.executable).parent
RUNTIME_FAILURES = (
    "did not complete within",  # ftmpi's spawn deadline: Open MPI never finished the spawn
    "PRTE has lost communication with a remote daemon",
    "free(): ",
    "corrupted size vs. prev_size",
)
"""How a re-spawn across nodes fails in Open MPI 5.0.11 (docs/recovery.md, known limitations:
open-mpi/ompi#12599, #13427); a run that fails otherwise fails the test."""


def test_a_dead_servers_replacement_goes_to_the_spare_node(cluster):
    run_dir = cluster.shared / "spare"
    cmd = [
        *(str(VENV / "ftmpi-run"), "-np", "2", "--servers", "3", "--strategy", "chain"),
        *("--hostfile", str(cluster.hostfile(slots=3)), "--spare-nodes", "n3"),
        *("--kill", "server:0@step=20", "--run-dir", str(run_dir)),
        *("--", str(VENV / "python"), str(PROGS / "ft_train.py"), "50", "--await-replacements"),
    ]
    # a replacement that never comes up is dropped after 30 s and spawned again (Open MPI's
    # start-up exchange can block it for good: docs/recovery.md, known limitations); worker 1
    # waits for worker 0, which holds the last step until a replacement has joined or 3 never
    # came up
    env = {"FTMPI_BACKEND": "mpi", "FTMPI_TIMEOUT": "120", "FTMPI_START_TIMEOUT": "30"}
    env["OMP_NUM_THREADS"] = "1"
    job = cluster.start_on("n1", cmd, env={**env, **cluster.mpi_env}, cwd=ROOT)
    try:
        out, err = job.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        out, err = "", "(ftmpi-run ran over 200 s)"
    finally:
        kill_tree(job.pid)
    log = (run_dir / "job.log").read_text() if (run_dir / "job.log").exists() else ""
    crash = next((s for s in RUNTIME_FAILURES if s in log + err), None)
    if job.returncode != 0 and crash:
        pytest.xfail(f"Open MPI's runtime failed the spawn onto the spare: {crash!r}")
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    layout = json.loads((run_dir / "manifest.json").read_text())["layout"]
    assert {r["node"] for r in layout["ranks"]} == {"n1", "n2"}  # the spare started empty
    assert layout["spare_nodes"] == ["n3"]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert json.loads((run_dir / "summary.json").read_text())["workers"] == 2  # none lost
    never_came_up(run_dir, "n3")
    ready = [e for e in events if e["event"] == "replacement_ready"]
    assert ready and all(e["nodes"] == ["n3"] for e in ready), ready
    if "PRTE ERROR" not in err:  # Open MPI's output forwarding can fail after a spawn
        assert "server 0 replaced (on n3)" in err
