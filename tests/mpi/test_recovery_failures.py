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


def test_a_replacement_that_never_comes_up_is_spawned_again(mpi, tmp_path):
    """Server 1 dies at step 20; the replacement spawned in the background dies before it says
    it is ready (failpoint ``starting``, as a new process that Open MPI started but that never
    comes up). Training goes on, the coordinator spawns again, the second replacement joins,
    and the weights equal the run without failures."""
    chain = {"FTMPI_STRATEGY": "chain", "FTMPI_CHAIN_LENGTH": "2", "FTMPI_START_TIMEOUT": "20"}
    extra = ("--await-replacements",)
    ref, _, _ = train(mpi, tmp_path, "ref", env=chain, extra=extra)
    env = {**chain, "FTMPI_KILL": "server:1@step=20", "FTMPI_FAILPOINTS": "starting@replacement"}
    # mpirun exits 137 for the killed spawned process (docs/recovery.md, known limitations)
    got, run_dir, res = train(mpi, tmp_path, "again", env=env, extra=extra, codes=(0, 137))
    assert got[0]["weights"] == got[1]["weights"] == ref[0]["weights"]
    assert got[0]["position"] == 60 and got[0]["workers"] == 2  # no worker was lost
    events = read_events(str(run_dir))
    kinds = [e["event"] for e in events]
    died = [e.get("spec") for e in events if e["event"] == "kill"]
    assert died == ["server:1@step=20", "starting@replacement:0#1"], died
    failed = [e for e in events if e["event"] == "spawn_failed"]
    assert len(failed) == 1 and failed[0]["slots"] == [1] and failed[0]["attempts_left"] == 2
    assert kinds.index("spawn_failed") < kinds.index("replacement_joined")
    assert sum(e["event"] == "spawn_started" for e in events) == 2
    assert "the replacement for server 1 did not come up" in res.stderr
