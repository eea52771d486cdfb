"""A second rank death during a recovery: the MPI calls of the recovery itself (Shrink, Split,
Split_type, Spawn, Merge) fail on the survivors, who start the recovery over instead of
ending the job; the run still finishes, bit-exact where the strategy promises it."""

from __future__ import annotations

import json

import pytest

from ftmpi.events import read_events
from tests.mpi.test_recovery import CKPT, train

pytestmark = pytest.mark.mpi


def test_a_server_dying_inside_the_recovery_restarts_it_bit_exact(mpi, tmp_path):
    """Server 1 dies at step 37; server 0 dies inside the recovery that follows, after its
    Shrink (failpoint ``shrunk``), so every survivor's Split of the new view fails with a
    process failure. They recover again, both servers are replaced, every rank rolls back to
    the newest snapshot, and the weights equal the run without failures."""
    ref, _, _ = train(mpi, tmp_path, "ref", env=CKPT)
    env = {**CKPT, "FTMPI_KILL": "server:1@step=37", "FTMPI_FAILPOINTS": "shrunk@server:0"}
    got, run_dir, _ = train(mpi, tmp_path, "twice", env=env)
    assert got[0]["weights"] == got[1]["weights"] == ref[0]["weights"]
    assert got[0]["position"] == 60
    events = read_events(str(run_dir))
    died = [e for e in events if e["event"] == "kill"]
    assert {e.get("spec") for e in died} >= {"server:1@step=37", "shrunk@server:0#1"}, died
    detected = [e for e in events if e["event"] == "failure_detected" and e["role"] == "worker 0"]
    assert len(detected) >= 2, detected  # the recovery was started over
    ready = [e for e in events if e["event"] == "replacement_ready" and e["role"] == "worker 0"]
    assert sorted(s for e in ready for s in e["slots"]) == [0, 1], ready
    # the run's record counts both deaths, the one inside the interrupted recovery too
    failures = json.loads((run_dir / "summary.json").read_text())["failures"]
    assert failures["failed_servers"] == 2 and failures["view_changes"] >= 2, failures
