"""A checkpoint directory that goes bad in a live job ends the job within seconds, naming the
directory and the fix; one without room for the model's snapshots is refused when the servers
first know the model's size. (A directory that is bad before launch is refused by ``ftmpi-run``
itself: tests/unit/test_preflight.py.)

The directories are real tmpfs mounts (this needs root): filled up, or remounted read-only,
while the job trains.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftmpi.snapshot import list_versions
from launch.proctree import kill_tree
from tests.conftest import start_command
from tests.mpi.common import PROG

pytestmark = pytest.mark.mpi

ENDS_WITHIN = 10.0
"""Seconds from the failed snapshot (the fatal error's time) to the end of the whole job."""


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    if os.geteuid() != 0:
        pytest.fail("these tests mount a tmpfs: run them as root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> None:
    """Write a file in ``directory`` until its filesystem has no space left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as exc:
        (directory / "probe").write_bytes(b"\0" * 8192)
    assert exc.value.errno == errno.ENOSPC


def remount_read_only(directory: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(directory)], check=True)


def _output(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{out[-4000:]}")
    return out, time.time()


@pytest.mark.parametrize(
    ("fault", "async_writer"), [("full", "0"), ("read-only", "1")], ids=["full", "read-only"]
)
def test_a_directory_that_goes_bad_mid_run_ends_the_job_within_seconds(
    tmp_path, fault, async_writer
):
    run_dir = tmp_path / "run"
    with tmpfs(tmp_path / "ck", "24m") as ck:
        cmd = [sys.executable, "-m", "launch.cli", "-np", "2", "--servers", "1"]
        cmd += ["--strategy", "checkpoint", "--checkpoint-every", "10"]
        cmd += ["--checkpoint-dir", str(ck), "--run-dir", str(run_dir), "--timeout", "120"]
        cmd += ["--", sys.executable, PROG, "100000", "--step-sleep", "0.05"]
        env = {"FTMPI_BACKEND": "mpi", "FTMPI_ASYNC_CHECKPOINT": async_writer}
        proc = start_command(cmd, env=env, merge_stderr=True)
        try:
            deadline = time.monotonic() + 150
            while not [v for v in list_versions(ck, 0) if v >= 10]:
                assert proc.poll() is None, proc.communicate()[0][-4000:]
                assert time.monotonic() < deadline, "no snapshot after step 10"
                time.sleep(0.1)
            fill(ck) if fault == "full" else remount_read_only(ck)
            out, ended = _output(proc, 120)
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid)
                proc.communicate()
    assert proc.returncode != 0, out[-4000:]
    fatal = json.loads((run_dir / "fatal.json").read_text())
    assert fatal["type"] == "SnapshotError" and fatal["role"] == "server 0", fatal
    assert ended - fatal["time"] < ENDS_WITHIN, (ended - fatal["time"], out[-4000:])
    cause = "No space left on device" if fault == "full" else "Read-only file system"
    assert f"cannot write a snapshot in {ck}: {cause}" in out, out[-4000:]
    assert "choose another directory with FTMPI_CHECKPOINT_DIR" in out
    assert "Traceback" not in out and "CommTimeout" not in out, out[-4000:]


def test_no_room_for_two_snapshots_of_the_model_is_refused_at_the_start(mpi, tmp_path):
    """Plain mpirun (no launcher check): the server refuses once it knows its shard's size."""
    with tmpfs(tmp_path / "ck", "64k") as ck:
        env = {
            "FTMPI_SERVERS": "1",
            "FTMPI_BACKEND": "mpi",
            "FTMPI_STRATEGY": "checkpoint",
            "FTMPI_CHECKPOINT_DIR": str(ck),
            "FTMPI_RUN_DIR": str(tmp_path / "run"),
            "FTMPI_TIMEOUT": "120",
        }
        t0 = time.monotonic()
        res = mpi(3, [PROG, "20", "--hidden", "2000"], env=env, timeout=120)
        took = time.monotonic() - t0
        assert list(ck.iterdir()) == []
    assert res.returncode != 0 and not res.json_lines(), res.stdout
    assert took < 60, took  # not the 120 s timeout
    assert f"checkpoint directory {ck} has 64.0 KiB free, less than " in res.stderr, res.stderr
    assert "free space there or choose another directory with FTMPI_CHECKPOINT_DIR" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
