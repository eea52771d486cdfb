"""``ftmpi-run``'s check of the checkpoint directory before it launches anything: a file, an
unwritable directory or a full one is refused in one line (path, what is wrong, the fix) with
exit status 2, and no launcher runs; a usable one passes and is left as it was.

Unwritable and full directories are real tmpfs mounts (read-only; 64 KiB), as in
test_snapshot_storage.py; without root to mount them, a mode-0500 directory stands in for the
read-only one, and the full-disk cases fail rather than pass untested.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ftmpi.config import Config
from ftmpi.snapshot import write_snapshot
from launch.preflight import EXIT_STATUS, MIN_FREE_BYTES, checkpoint_dir_problem
from launch.preflight import refuse_unusable_checkpoint_dir as refuse
from tests.conftest import ROOT


def _config(directory: Path | str, **kw) -> Config:
    return Config(servers=1, strategy="checkpoint", checkpoint_dir=str(directory), **kw)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` for the body (root only: the test fails otherwise)."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root; run this test as root")
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def read_only(path: Path):
    """``path``, an existing directory that nobody (root included) can create files in."""
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o500)
        try:
            yield path
        finally:
            path.chmod(0o700)
        return
    with tmpfs(path, "size=1m,mode=0700"):
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path


def test_a_job_without_snapshots_is_not_checked(tmp_path):
    (tmp_path / "ck").write_text("a file")
    assert checkpoint_dir_problem(Config(servers=1, checkpoint_dir=str(tmp_path / "ck"))) is None


def test_a_usable_directory_passes_and_a_missing_one_is_not_created(tmp_path):
    assert checkpoint_dir_problem(_config(tmp_path)) is None
    missing = tmp_path / "run" / "checkpoints"
    assert checkpoint_dir_problem(_config(missing)) is None
    assert list(tmp_path.iterdir()) == [], "the check left something behind"
    # the default, <run_dir>/checkpoints, is checked too
    default = Config(servers=1, strategy="checkpoint", run_dir=str(tmp_path / "run"))
    assert default.snapshot_dir == str(missing) and checkpoint_dir_problem(default) is None
    (tmp_path / "run").write_text("a file where the run directory goes")
    assert "cannot be created" in (checkpoint_dir_problem(default) or "")


def test_a_file_is_refused(tmp_path):
    f = tmp_path / "ck"
    f.write_text("not a directory")
    why = checkpoint_dir_problem(_config(f))
    assert why == (
        f"checkpoint directory {f} is a file, not a directory; remove it or choose another "
        "directory with --checkpoint-dir (FTMPI_CHECKPOINT_DIR)"
    )
    why = checkpoint_dir_problem(_config(f / "sub" / "dir"))
    assert why is not None and f"{f / 'sub' / 'dir'} cannot be created: {f} is a file" in why


def test_a_read_only_directory_is_refused(tmp_path):
    with read_only(tmp_path / "ro") as ro:
        why = checkpoint_dir_problem(_config(ro))
        assert why is not None and why.startswith(f"checkpoint directory {ro} is not writable")
        assert "make it writable or choose another directory with --checkpoint-dir" in why
        why = checkpoint_dir_problem(_config(ro / "checkpoints"))
        assert why is not None and f"cannot be created: {ro} is not writable" in why


def test_a_directory_without_room_for_two_snapshots_is_refused(tmp_path):
    with tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        why = checkpoint_dir_problem(_config(tiny))
        assert why == (
            f"checkpoint directory {tiny} has 64.0 KiB free, less than 16.0 MiB (the least a "
            "job that writes snapshots starts with); free space there or choose another "
            "directory with --checkpoint-dir (FTMPI_CHECKPOINT_DIR)"
        )
        assert MIN_FREE_BYTES == 16 << 20
    with tmpfs(tmp_path / "small", "size=1m") as small:
        # with snapshots there, their size decides: 2 x 10 KiB fits in 1 MiB ...
        meta = {"version": 10, "run_id": "a"}
        write_snapshot(small, 0, 10, meta, np.zeros(10 << 10, np.uint8), keep=3)
        assert checkpoint_dir_problem(_config(small)) is None
        # ... two shards of 400 KiB (800 KiB a snapshot of the model) do not
        for shard in (0, 1):
            payload = np.zeros(400 << 10, np.uint8)
            write_snapshot(small, shard, 20, {"version": 20, "run_id": "a"}, payload, keep=3)
        why = checkpoint_dir_problem(_config(small))
        assert why is not None and why.startswith(f"checkpoint directory {small} has ")
        assert "less than 1.6 MiB (2 snapshots of the model there, 800.2 KiB each)" in why


def test_the_refusal_is_one_line_and_exit_status_2(tmp_path, capsys):
    f = tmp_path / "ck"
    f.write_text("")
    with pytest.raises(SystemExit) as exc:
        refuse(_config(f))
    assert exc.value.code == EXIT_STATUS == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ftmpi-run: checkpoint directory {f} is a")
    refuse(_config(tmp_path / "ok"))  # returns


@pytest.mark.parametrize("bad", ["file", "read-only", "full"])
def test_ftmpi_run_refuses_before_any_launcher_runs(tmp_path, bad):
    marker = tmp_path / "launched"
    fake = tmp_path / "mpirun"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    ck = tmp_path / "ck"
    with contextlib.ExitStack() as stack:
        if bad == "file":
            ck.write_text("")
        elif bad == "read-only":
            stack.enter_context(read_only(ck))
        else:
            stack.enter_context(tmpfs(ck, "size=64k"))
        cmd = [sys.executable, "-m", "launch.cli", "-np", "2", "--servers", "1"]
        cmd += ["--strategy", "checkpoint", "--checkpoint-dir", str(ck), "--mpirun", str(fake)]
        cmd += ["--run-dir", str(tmp_path / "run"), "--", sys.executable, "-c", "pass"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FTMPI_")}
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        took = time.monotonic() - t0
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert not marker.exists(), "the launcher ran"
    assert took < 30, took
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ftmpi-run: checkpoint directory {ck}"), lines
    assert "--checkpoint-dir" in lines[0] and "Traceback" not in res.stderr
