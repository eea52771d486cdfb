"""Real rank deaths (SIGKILL from inside the rank at a scheduled step) survived through ULFM."""

from __future__ import annotations

import json
import sys

import pytest

from ftmpi.events import read_events
from tests.conftest import PROGS, run_command

pytestmark = pytest.mark.mpi

PROG = str(PROGS / "ft_train.py")


def train(mpi, tmp_path, name, *, steps=60, servers=2, env=None, extra=(), timeout=240, codes=(0,)):
    run_dir = tmp_path / name
    full_env = {
        "FTMPI_SERVERS": str(servers),
        "FTMPI_RUN_DIR": str(run_dir),
        "FTMPI_BACKEND": "mpi",
        **(env or {}),
    }
    # After a re-spawn, Open MPI's MPI_Finalize can hang at exit (docs/recovery.md, known
    # limitations): a job that printed both workers' results and then hung is killed and its
    # results checked.
    res = mpi(
        2 + servers,
        [PROG, str(steps), *extra],
        env=full_env,
        timeout=timeout,
        exit_hang_after=2 if "FTMPI_KILL" in full_env else 0,
    )
    assert res.returncode in (*codes, -9), res.stderr[-3000:]
    reports = sorted(res.json_lines(), key=lambda r: r["worker"])
    assert len(reports) == 2, res.stdout
    return reports, run_dir, res


CKPT = {"FTMPI_STRATEGY": "checkpoint", "FTMPI_CHECKPOINT_EVERY": "10"}


@pytest.mark.parametrize("async_writer", ["0", "1"])
def test_checkpoint_sync_server_kill_is_bit_exact(mpi, tmp_path, async_writer):
    env = {**CKPT, "FTMPI_ASYNC_CHECKPOINT": async_writer}
    ref, _, _ = train(mpi, tmp_path, "ref", env=env)
    got, run_dir, _ = train(mpi, tmp_path, "kill", env={**env, "FTMPI_KILL": "server:1@step=37"})
    assert got[0]["weights"] == got[1]["weights"] == ref[0]["weights"]
    assert got[0]["rollbacks"] == 1 and got[0]["position"] == 60
    # the server died after applying update 37; the worker's step 37 failed and was rolled
    # back to the newest snapshot every server has: 30 with synchronous writes; with the
    # background writer, an earlier one if the writes of 30 (or 20) were not durable yet on
    # a loaded machine. 38 gradients computed, then 60 minus that position more.
    events = read_events(str(run_dir))
    rollbacks = [e for e in events if e["event"] == "rollback" and e["role"] == "worker 0"]
    (back,) = [e["position"] for e in rollbacks]
    assert (back == 30) if async_writer == "0" else (back in (10, 20, 30)), back
    assert got[0]["computed"] == 38 + (60 - back)
    kinds = [e["event"] for e in events]
    for a, b in [
        ("failure_detected", "view_change"),
        ("view_change", "replacement_ready"),
        ("replacement_ready", "restored"),
        ("restored", "rollback"),
    ]:
        assert kinds.index(a) < kinds.index(b), kinds


def test_checkpoint_corrupt_snapshot_falls_back_to_the_previous_one(mpi, tmp_path):
    ref, _, _ = train(mpi, tmp_path, "ref", env=CKPT)
    got, run_dir, res = train(
        mpi,
        tmp_path,
        "kill",
        env={**CKPT, "FTMPI_KILL": "server:0@step=37"},
        extra=["--corrupt-at", "35"],
    )
    assert got[0]["weights"] == ref[0]["weights"]
    assert got[0]["computed"] == 38 + 40  # the snapshot at 30 was truncated: back to 20
    assert "skipping invalid snapshot" in res.stderr and "shard000-v000000000030" in res.stderr
    warnings = [e for e in read_events(str(run_dir)) if e["event"] == "warning"]
    assert warnings and "checksum mismatch" in warnings[0]["message"]


def test_strategy_none_reports_a_server_death_clearly(tmp_path):
    """Through ``ftmpi-run``: a plain ``mpirun`` can exit 0, or not at all, after the workers'
    ``MPI_Abort`` that follows a death (docs/recovery.md, known limitations)."""
    res = run_command(
        [
            *(sys.executable, "-m", "launch.cli", "-np", "2", "--servers", "1"),
            *("--strategy", "none", "--kill", "server:0@step=10", "--run-dir", str(tmp_path)),
            *("--", sys.executable, PROG, "30"),
        ],
        env={"FTMPI_BACKEND": "mpi"},
        timeout=120,
    )
    assert res.returncode == 1, res.stderr[-3000:]
    # the run's record, since Open MPI's output forwarding has garbled the printed line (NULs)
    fatal = json.loads((tmp_path / "fatal.json").read_text())
    assert "strategy='none' cannot recover" in fatal["message"], fatal
    assert "cannot recover their state" in res.stderr


def test_trainer_event_log_shows_kill_detection_recovery(mpi, tmp_path):
    from tests.conftest import ROOT

    res = mpi(
        3,
        [
            str(ROOT / "examples" / "paper_trainer.py"),
            "--data",
            "synthetic:512",
            "--steps",
            "40",
            "--eval-every",
            "20",
            "--no-progress",
            "--run-dir",
            str(tmp_path),
        ],
        env={"FTMPI_SERVERS": "1", **CKPT, "FTMPI_KILL": "server:0@step=25"},
        timeout=120,
        exit_hang_ok=(tmp_path / "summary.json").exists,
    )
    assert res.returncode in (0, -9), res.stderr[-3000:]  # -9: documented exit hang
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 40
    kinds = [e["event"] for e in read_events(str(tmp_path))]
    assert (
        kinds.index("failure_detected") < kinds.index("replacement_ready") < kinds.index("rollback")
    )


def test_sigusr1_snapshot_then_resume_is_bit_exact(mpi, tmp_path):
    """A batch system's SIGUSR1 writes a snapshot of the last completed step; a relaunch with
    FTMPI_RESUME=1 starts there and ends with the weights of an uninterrupted run."""
    env = {**CKPT, "FTMPI_CHECKPOINT_EVERY": "1000"}  # only the initial and the signal's
    ref, _, _ = train(mpi, tmp_path, "ref", env=env)
    _, run_dir, res = train(mpi, tmp_path, "first", steps=40, env=env, extra=["--usr1-at", "25"])
    assert "SIGUSR1: snapshot of step 25" in res.stderr
    signal = [e for e in read_events(str(run_dir)) if e["event"] == "signal_checkpoint"]
    assert [(e["version"], e["position"]) for e in signal] == [(25, 25)]
    again, _, res = train(
        mpi,
        tmp_path,
        "again",
        env={**env, "FTMPI_RESUME": "1", "FTMPI_CHECKPOINT_DIR": str(run_dir / "checkpoints")},
    )
    assert "resumed from the snapshot at step 25" in res.stderr
    assert [r["first_step"] for r in again] == [25, 25] and again[0]["computed"] == 35
    assert again[0]["weights"] == again[1]["weights"] == ref[0]["weights"]


def test_checkpoint_async_server_kill_rolls_back_and_finishes(mpi, tmp_path):
    env = {**CKPT, "FTMPI_MODE": "async", "FTMPI_KILL": "server:1@step=57"}
    got, run_dir, _ = train(mpi, tmp_path, "kill", env=env)
    # every worker rewound to the smallest position a shard's snapshot recorded for it
    assert [r["rollbacks"] for r in got] == [1, 1] and [r["position"] for r in got] == [60, 60]
    assert all(r["computed"] > 60 for r in got)  # the rewound steps were computed again
    rollbacks = [e for e in read_events(str(run_dir)) if e["event"] == "rollback"]
    assert len(rollbacks) == 2 and all(0 < e["position"] < 60 for e in rollbacks)


def test_server_dies_half_way_through_a_snapshot_write(mpi, tmp_path):
    ref, _, _ = train(mpi, tmp_path, "ref", env=CKPT)
    # the third write (version 20) dies after its temporary file is fsynced, before the rename
    got, run_dir, _ = train(
        mpi, tmp_path, "kill", env={**CKPT, "FTMPI_FAILPOINTS": "snapshot_write@server:0#3"}
    )
    assert got[0]["weights"] == got[1]["weights"] == ref[0]["weights"]
    assert got[0]["computed"] == 20 + 50  # back to the snapshot at 10
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and "v000000000020" in leftovers[0]  # ignored, never loaded


def test_without_ulfm_the_job_says_so_and_a_death_ends_it(tmp_path):
    from tests.conftest import mpi_command, run_command

    cmd = [c for c in mpi_command(3, [PROG, "60"]) if c not in ("--with-ft", "ulfm")]
    env = {"FTMPI_SERVERS": "1", "FTMPI_RUN_DIR": str(tmp_path), "FTMPI_BACKEND": "mpi"}
    res = run_command(cmd, env={**env, **CKPT, "FTMPI_KILL": "server:0@step=20"}, timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("runs without ULFM fault tolerance") == 1
    assert f"resumes from the newest valid snapshot in {tmp_path}/checkpoints" in res.stderr
