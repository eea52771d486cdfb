"""Shared test helpers. MPI tests launch the venv's own ``mpirun --with-ft ulfm`` (Open MPI 5)
under a wall-clock limit; a test that overruns kills the whole process group and fails."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.proctree import kill_tree

ROOT = Path(__file__).resolve().parents[1]
PROGS = ROOT / "tests" / "mpi" / "progs"
MPIRUN = Path(sys.executable).parent / "mpirun"


@dataclass
class MPIResult:
    returncode: int
    stdout: str
    stderr: str

    def json_lines(self) -> list[dict]:
        """Every stdout line that parses as a JSON object."""
        out = []
        for line in self.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out


def mpi_command(np_: int, args: list[str]) -> list[str]:
    cmd = [str(MPIRUN), "--with-ft", "ulfm", "--oversubscribe", "-np", str(np_)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    return [*cmd, sys.executable, *args]


def run_mpi(
    np_: int,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
    exit_hang_after: int = 0,
    exit_hang_ok: Callable[[], bool] | None = None,
    exit_hang_grace: float | None = None,
) -> MPIResult:
    """Run ``python ARGS`` on ``np_`` ranks; kill the job and fail the test after ``timeout``.

    ``exit_hang_after=N``: if the job overruns *after* printing N JSON result lines, kill it and
    return ``returncode=-9`` instead of failing (the documented MPI_Finalize hang after a
    re-spawn; the caller still checks every result). ``exit_hang_ok``: the same, decided by a
    callable (e.g. the run's summary file is complete); with ``exit_hang_grace``, asked every
    second, and the job is killed that many seconds after it first says yes.

    A launch in which Open MPI's runtime itself failed to start (no rank ran, nothing on
    stdout, :data:`RUNTIME_START_FAILURES` on stderr) is launched once more: that is the
    machine's, not the test's (docs/testing.md)."""
    for attempt in (1, 2):
        res = run_command(
            mpi_command(np_, args),
            env=env,
            timeout=timeout,
            cwd=cwd,
            exit_hang_after=exit_hang_after,
            exit_hang_ok=exit_hang_ok,
            exit_hang_grace=exit_hang_grace,
        )
        if attempt == 1 and runtime_failed_to_start(res):
            continue
        return res
    raise AssertionError("unreachable")


RUNTIME_START_FAILURES = ("The PMIx server's listener thread failed to start",)
"""What Open MPI's runtime prints when it could not start at all (before any rank ran)."""


def runtime_failed_to_start(res: MPIResult) -> bool:
    """Whether ``mpirun`` ended before starting any rank because its runtime failed to start."""
    return (
        res.returncode != 0
        and not res.stdout.strip()
        and any(msg in res.stderr for msg in RUNTIME_START_FAILURES)
    )


def start_command(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    merge_stderr: bool = False,
) -> subprocess.Popen[str]:
    """Start ``cmd`` in its own process group (text pipes; stderr into stdout with
    ``merge_stderr``), without the caller's ``FTMPI_*`` variables; the caller waits for it
    under a deadline and kills its tree (:func:`launch.proctree.kill_tree`) if it overruns."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FTMPI_")}
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    full_env.update(env or {})
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        start_new_session=True,
    )


def run_command(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
    exit_hang_after: int = 0,
    exit_hang_ok: Callable[[], bool] | None = None,
    exit_hang_grace: float | None = None,
) -> MPIResult:
    """Run ``cmd`` (``mpirun`` or a launcher such as ``ftmpi-run``) in its own process group,
    without the caller's ``FTMPI_*`` variables, under the wall-clock limit and exit-hang
    tolerance of :func:`run_mpi`."""
    proc = start_command(cmd, env=env, cwd=cwd)
    end = time.monotonic() + timeout
    grace = exit_hang_grace if exit_hang_ok is not None else None  # polled every second
    hang_ok_at = None  # when exit_hang_ok first said yes
    while True:
        try:  # a communicate() retried after its timeout loses no output
            out, err = proc.communicate(
                timeout=max(0.0, end - time.monotonic()) if grace is None else 1.0
            )
            return MPIResult(proc.returncode, out, err)
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if grace is not None and hang_ok_at is None and exit_hang_ok():
                hang_ok_at = now
            if now >= end or (hang_ok_at is not None and now - hang_ok_at >= grace):
                break
    kill_tree(proc.pid)  # mpirun's ranks sit in process groups of their own
    out, err = proc.communicate()
    done = MPIResult(-9, out, err)
    if exit_hang_after and len(done.json_lines()) >= exit_hang_after:
        return done
    if exit_hang_ok is not None and exit_hang_ok():
        return done
    pytest.fail(
        f"{cmd[0]} exceeded {timeout} s: {cmd[1:]}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    )


@pytest.fixture
def mpi():
    if not MPIRUN.exists():
        pytest.fail(f"{MPIRUN} not found: install the project (make setup) to get Open MPI 5")
    return run_mpi
