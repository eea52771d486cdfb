"""The exit status is the outcome, failure paths end in seconds, and no process outlives
``ftmpi-run``: real jobs under ``ftmpi-run``, each under a wall-clock limit."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch.proctree import descendants, kill_tree
from tests.conftest import PROGS, run_command, start_command

pytestmark = pytest.mark.mpi

FTMPI_RUN = [sys.executable, "-m", "launch.cli"]
TRAIN = [sys.executable, str(PROGS / "ft_train.py")]


def test_a_worker_raising_ends_the_job_in_seconds_with_the_error_shown_once(tmp_path):
    run_dir = tmp_path / "run"
    started = time.monotonic()
    res = run_command(
        [
            *FTMPI_RUN,
            *("-np", "2", "--servers", "1", "--run-dir", str(run_dir), "--"),
            *(*TRAIN, "200", "--raise-at", "10"),
        ],
        env={"FTMPI_BACKEND": "mpi"},
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert res.returncode == 1, res.stderr[-3000:]
    assert elapsed < 20, f"the job took {elapsed:.1f} s to end after a worker raised"
    both = res.stdout + res.stderr
    assert both.count("ValueError: a bug in the training script at step 10") == 2  # once + cause
    assert "[ftmpi worker 1 (rank 1)] Traceback" in res.stderr
    assert "did not finish: worker 1 (rank 1) raised ValueError" in res.stdout
    assert "MPI_ABORT" not in both and "CommTimeout" not in both
    fatal = json.loads((run_dir / "fatal.json").read_text())
    assert (fatal["role"], fatal["type"]) == ("worker 1", "ValueError")
    assert json.loads((run_dir / "launcher.json").read_text())["returncode"] == 1


def test_a_job_surviving_two_kills_of_the_same_server_exits_0_quietly(tmp_path):
    run_dir = tmp_path / "run"
    res = run_command(
        [
            *FTMPI_RUN,
            *("-np", "2", "--servers", "3", "--strategy", "chain"),
            *("--kill", "server:0@step=20", "--kill", "server:0@step=45"),
            *("--run-dir", str(run_dir), "--", *TRAIN, "60", "--await-replacements"),
        ],
        env={"FTMPI_BACKEND": "mpi"},
        timeout=150,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "finished training; exit status 0" in res.stdout
    for noise in ("NBC_Progress", "signal 9 (Killed)", "injected failure", "PMIX ERROR"):
        assert noise not in res.stdout + res.stderr, noise
    assert res.stderr.count("ftmpi: server 0 died") == 2, res.stderr
    assert res.stderr.count("ftmpi: recovered: server 0 replaced") == 2, res.stderr
    log = (run_dir / "job.log").read_text()
    assert "injected failure: server:0@step=20" in log and "NBC_Progress" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["steps"] == 60


def _job_pids(launcher: subprocess.Popen, run_id: str) -> set[int]:
    pids = set(descendants(launcher.pid))
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
                if f"FTMPI_RUN_ID={run_id}".encode() in f.read().split(b"\0"):
                    pids.add(int(entry))
    pids.discard(launcher.pid)
    return {p for p in pids if os.path.exists(f"/proc/{p}")}


def _start(tmp_path, run_id: str, *extra: str) -> subprocess.Popen:
    cmd = [*FTMPI_RUN, "-np", "2", "--servers", "1", *extra]
    cmd += ["--run-dir", str(tmp_path / "run"), "--", *TRAIN, "100000", "--step-sleep", "0.02"]
    env = {"FTMPI_BACKEND": "mpi", "FTMPI_RUN_ID": run_id}
    return start_command(cmd, env=env, merge_stderr=True)


def _wait_for_training(launcher: subprocess.Popen, run_id: str, run_dir) -> set[int]:
    """The job's processes once every rank is past ``ftmpi.init()`` (worker 0 has written the
    manifest, which every worker's start takes part in)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = _job_pids(launcher, run_id)
        ranks_up = [p for p in pids if "ft_train.py" in _cmdline(p)]
        if len(ranks_up) >= 3 and (run_dir / "manifest.json").exists():
            return pids
        time.sleep(0.2)
    kill_tree(launcher.pid)
    pytest.fail("the job did not start training within 60 s")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_killing_ftmpi_run_leaves_no_process_of_the_job(tmp_path, sig):
    run_id = f"orphans-{sig.name}"
    launcher = _start(tmp_path, run_id)
    try:
        job = _wait_for_training(launcher, run_id, tmp_path / "run")
        os.kill(launcher.pid, sig)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in job):
            time.sleep(0.1)
        left = {p: _cmdline(p) for p in job if os.path.exists(f"/proc/{p}")}
        left = {p: c for p, c in left.items() if c}  # zombies have no command line
        assert not left, f"5 s after {sig.name} of ftmpi-run these were still running: {left}"
    finally:
        for p in _job_pids(launcher, run_id):
            kill_tree(p)
        kill_tree(launcher.pid)


def test_sigterm_says_so_and_how_to_resume_and_the_record_keeps_every_attempt(tmp_path):
    run_id = "interrupted"
    launcher = _start(tmp_path, run_id, "--strategy", "checkpoint", "--checkpoint-every", "10")
    try:
        _wait_for_training(launcher, run_id, tmp_path / "run")
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate(timeout=30)
    finally:
        kill_tree(launcher.pid)
    assert launcher.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "SIGTERM received" in out and "interrupted by SIGTERM" in out
    resume = out.split("Resume it with: ", 1)[1].splitlines()[0]
    assert "--resume" in resume and f"--run-dir {tmp_path / 'run'}" in resume
    record = json.loads((tmp_path / "run" / "launcher.json").read_text())
    assert record["attempts"][0]["signal"] == "SIGTERM"
    assert record["returncode"] == 143 and record["finished"] is False
