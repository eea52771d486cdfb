"""The worker's recovery (ftmpi.worker_recovery) under real failures: a rollback that cannot
restore stops every worker with the coordinator's error at once, and a step whose gradients the
loop already synchronized is retried on those gradients, not reduced a second time."""

from __future__ import annotations

import json
import time

import pytest

from ftmpi.events import read_events
from ftmpi.snapshot import list_versions, snapshot_path
from tests.mpi.common import PROG

pytestmark = pytest.mark.mpi

STEPS = 60


def _run(mpi, run_dir, env, *, workers=2, servers=3, steps=STEPS, extra=()):
    full_env = {
        "FTMPI_SERVERS": str(servers),
        "FTMPI_RUN_DIR": str(run_dir),
        "FTMPI_BACKEND": "mpi",
        **env,
    }
    return mpi(
        workers + servers,
        [PROG, str(steps), "--await-replacements", *extra],
        env=full_env,
        timeout=240,
        exit_hang_after=workers if "FTMPI_KILL" in full_env else 0,
    )


def test_a_restore_the_servers_refuse_stops_every_worker_with_its_error_at_once(mpi, tmp_path):
    """The coordinator's ``restore_snapshots`` raises a plain RuntimeError (no version is valid
    on every shard: shard 1's snapshots are gone); every worker raises it too, long before the
    timeout, instead of the others waiting in the rollback's broadcast."""
    env = {
        "FTMPI_STRATEGY": "checkpoint",
        "FTMPI_CHECKPOINT_EVERY": "10",
        "FTMPI_TIMEOUT": "120",
    }
    first = _run(mpi, tmp_path / "first", env, servers=2, steps=20)
    assert first.returncode == 0, first.stderr[-3000:]
    ck = tmp_path / "first" / "checkpoints"
    assert list_versions(ck, 0) and list_versions(ck, 1)
    for v in list_versions(ck, 1):
        snapshot_path(ck, 1, v).unlink()
    run_dir = tmp_path / "again"
    t0 = time.monotonic()
    res = _run(
        mpi,
        run_dir,
        {**env, "FTMPI_RESUME": "1", "FTMPI_CHECKPOINT_DIR": str(ck)},
        servers=2,
        steps=40,
    )
    took = time.monotonic() - t0
    assert res.returncode != 0, res.stderr[-3000:]
    assert took < 60, took  # not the 120 s timeout
    fatal = json.loads((run_dir / "fatal.json").read_text())
    assert fatal["type"] == "RuntimeError", fatal
    assert "no snapshot version is valid on every shard" in fatal["message"], fatal
    raised = {
        e["role"]: (e["type"], e["message"])
        for e in read_events(str(run_dir))
        if e["event"] == "rank_raised"
    }
    assert raised.get("worker 0") == raised.get("worker 1") == (fatal["type"], fatal["message"]), (
        raised
    )


CHAIN = {"FTMPI_STRATEGY": "chain", "FTMPI_CHAIN_LENGTH": "3"}


def _weights(res):
    assert res.returncode in (0, -9), res.stderr[-3000:]
    got = sorted(res.json_lines(), key=lambda r: r["worker"])
    assert len(got) == 2, res.stdout + res.stderr[-2000:]
    assert got[0]["weights"] == got[1]["weights"], got
    return got[0]["weights"]


def test_a_synchronized_step_retried_after_a_server_death_is_not_reduced_twice(mpi, tmp_path):
    """Every step calls ``synchronize()`` and steps inside ``skip_synchronize()`` with op=Sum;
    the chain's head dies with a push in flight, so that step is retried. The weights equal the
    same run without the death, and the run that lets ``step()`` reduce."""
    sync = ["--op", "sum", "--synchronize"]
    plain = _weights(_run(mpi, tmp_path / "plain", CHAIN, extra=["--op", "sum"]))
    ref = _weights(_run(mpi, tmp_path / "ref", CHAIN, extra=sync))
    assert ref == plain
    run_dir = tmp_path / "kill"
    got = _weights(_run(mpi, run_dir, {**CHAIN, "FTMPI_KILL": "server:0@step=37"}, extra=sync))
    resumed = [
        e for e in read_events(str(run_dir)) if e["event"] == "step_resumed" and e["position"] > 30
    ]
    assert resumed, "no step was retried after the server's death"
    assert got == ref


def test_synchronize_then_skip_synchronize_without_servers_reduces_once(mpi, tmp_path):
    """Plain data parallelism (servers=0): ``step()`` inside ``skip_synchronize()`` applies the
    gradients ``synchronize()`` reduced, as Horovod does, not their sum over the workers."""
    run = {"servers": 0, "steps": 20}
    plain = _weights(_run(mpi, tmp_path / "plain", {}, extra=["--op", "sum"], **run))
    sync = _weights(_run(mpi, tmp_path / "sync", {}, extra=["--op", "sum", "--synchronize"], **run))
    assert sync == plain
