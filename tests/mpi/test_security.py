"""What a job exposes: the modes of the files and directories it creates, and the network ports
it listens on (none beyond those MPI itself opens)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, mpi_command
from tests.mpi.common import PROG

pytestmark = pytest.mark.mpi

HELLO = (
    "import time; from mpi4py import MPI; c = MPI.COMM_WORLD; c.Barrier(); "
    "time.sleep(6); c.Barrier()"
)


def _job_pids(pgid: int) -> set[int]:
    pids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.add(int(d.name))
    return pids


def _listeners(args: list[str], env: dict[str, str], timeout: float = 180) -> dict[str, int]:
    """Run ``args`` on 4 ranks; the most TCP/UDP listening sockets any of its processes held at
    once, per program (``prterun``, ``python``), sampled with ``ss`` while it ran."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FTMPI_")}
    full_env.update({"OMP_NUM_THREADS": "1", **env})
    proc = subprocess.Popen(
        mpi_command(4, args),
        env=full_env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    most: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            pids = _job_pids(proc.pid)
            out = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True).stdout
            count: dict[tuple[str, int], int] = {}
            for name, pid in re.findall(r'\("([^"]+)",pid=(\d+),', out):
                if int(pid) in pids:
                    count[name, int(pid)] = count.get((name, int(pid)), 0) + 1
            for (name, _), n in count.items():
                most[name] = max(most.get(name, 0), n)
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        output = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == 0, output[-3000:]
    return most


def test_a_job_listens_on_no_port_beyond_what_mpi_opens(tmp_path):
    plain = _listeners(["-c", HELLO], {})
    job = _listeners(
        [PROG, "40", "--step-sleep", "0.1"],
        {
            "FTMPI_SERVERS": "2",
            "FTMPI_BACKEND": "mpi",
            "FTMPI_STRATEGY": "checkpoint",
            "FTMPI_RUN_DIR": str(tmp_path / "run"),
        },
    )
    assert plain, "ss saw no listening socket of the plain MPI job: the comparison is void"
    assert set(job) <= set(plain), (job, plain)
    assert all(n <= plain[name] for name, n in job.items()), (job, plain)


def test_run_files_are_private(mpi, tmp_path):
    run_dir = tmp_path / "runs" / "r"
    env = {
        "FTMPI_SERVERS": "1",
        "FTMPI_BACKEND": "mpi",
        "FTMPI_STRATEGY": "checkpoint",
        "FTMPI_CHECKPOINT_EVERY": "5",
        "FTMPI_RUN_DIR": str(run_dir),
    }
    res = mpi(3, [PROG, "10"], env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    paths = [run_dir, *run_dir.rglob("*")]
    exposed = {str(p): oct(p.stat().st_mode) for p in paths if p.stat().st_mode & 0o007}
    assert not exposed, exposed
    snaps = list((run_dir / "checkpoints").glob("*.ftck"))
    assert snaps and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in snaps)
    assert stat.S_IMODE((run_dir / "checkpoints").stat().st_mode) == 0o700
    assert stat.S_IMODE(run_dir.stat().st_mode) in (0o700, 0o750)
