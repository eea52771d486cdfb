"""Run the job, and relaunch it after a failure (``--max-restarts``).

A job that exits non-zero (an MPI without ULFM, or a failure its strategy does not survive) is
started again, up to ``max_restarts`` times, with the same ``FTMPI_RUN_ID``, run directory and
``FTMPI_JOB_START``, and with ``FTMPI_RESUME=1`` so training continues from the newest snapshot
every shard has. Kills the failed job already carried out are not repeated: the relaunch gets
the remaining schedule (see :func:`launch.kills.remaining_schedule`). Which kills fired is read
from the ``kill`` events in ``events.jsonl``: the launcher copies the job's output through line
by line and logs a ``kill`` event for every ``ftmpi: injected failure: SPEC (pid N)`` line a
rank prints as it dies (a kill the rank logged itself is counted once). A job that exits
non-zero after its trainer wrote ``summary.json`` has finished training and is not relaunched.

**Lost time** of a restart is the wall time from the failed job's exit to the relaunched job's
first output (stdout or stderr, e.g. a progress bar): the time until the job runs again, which
is MPI start-up plus the script's start-up. If the relaunched job prints nothing until it ends,
it is measured to that output, or to its exit. Work redone from the snapshot onwards is not
included (it shows as the rolled-back steps).

Every attempt is recorded in ``<run_dir>/launcher.json`` as soon as it ends, so the record
survives a launcher that is itself killed later.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ftmpi.faults import KillSpec, format_schedule
from ftmpi.manifest import write_json_atomic
from launch.kills import log_injected, logged_kills, remaining_schedule
from launch.rundir import LAUNCHER_RECORD, is_finished

LOST_TIME = (
    "wall seconds from a failed job's exit to the relaunched job's first output "
    "(or its exit if it prints nothing)"
)


@dataclass
class Attempt:
    """One start of the job."""

    number: int
    command: list[str]
    kill: str
    resume: int
    started: float
    ended: float = 0.0
    returncode: int | None = None
    first_output: float | None = None
    injected: list[str] = field(default_factory=list)
    """Kill specs its ranks reported carrying out (from their output)."""
    lost_seconds: float | None = None
    """For a relaunch: see the module docstring."""

    @property
    def wall_seconds(self) -> float:
        return round(self.ended - self.started, 3)


@dataclass
class LaunchReport:
    """What the launcher did: every attempt, the restarts and the time they lost."""

    run_id: str
    run_dir: str
    max_restarts: int
    schedule: str
    random_kills: dict[str, Any] | None
    attempts: list[Attempt] = field(default_factory=list)
    invocation: dict[str, Any] | None = None
    """How ``ftmpi-run`` was called (``argv``, ``cwd``, the caller's ``FTMPI_*`` variables,
    ``python``): what ``ftmpi-run replay`` re-runs."""

    @property
    def restarts(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def lost_seconds(self) -> float:
        return round(sum(a.lost_seconds or 0.0 for a in self.attempts), 3)

    @property
    def returncode(self) -> int:
        rc = self.attempts[-1].returncode if self.attempts else 1
        return 128 - rc if rc is not None and rc < 0 else int(rc or 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "max_restarts": self.max_restarts,
            "kill_schedule": self.schedule,
            "random_kills": self.random_kills,
            "invocation": self.invocation,
            "restarts": self.restarts,
            "lost_seconds": self.lost_seconds,
            "lost_time_definition": LOST_TIME,
            "returncode": self.returncode,
            "attempts": [{**asdict(a), "wall_seconds": a.wall_seconds} for a in self.attempts],
        }

    def write(self) -> None:
        write_json_atomic(Path(self.run_dir) / LAUNCHER_RECORD, self.to_json())

    def final_line(self) -> str:
        return (
            f"ftmpi-run: run {self.run_id} exited with status {self.returncode} after "
            f"{self.restarts} restart(s), lost time {self.lost_seconds:.1f} s; "
            f"record in {Path(self.run_dir) / LAUNCHER_RECORD}"
        )


def run_with_restarts(
    make_command: Callable[[Mapping[str, str]], list[str]],
    job_env: Mapping[str, str],
    report: LaunchReport,
    *,
    schedule: Sequence[KillSpec],
    job_start: float,
    process_env: Callable[[Mapping[str, str]], dict[str, str]],
) -> LaunchReport:
    """Start the job (``make_command(env)`` with ``process_env(env)`` as its environment)
    and relaunch it on failure up to ``report.max_restarts`` times; see the module docstring.
    Returns ``report`` filled in; its ``returncode`` is the last attempt's (``128 + signal``
    for a job killed by a signal)."""
    remaining = list(schedule)
    while True:
        env = dict(job_env)
        env["FTMPI_KILL"] = format_schedule(remaining)
        if report.attempts:
            env["FTMPI_RESUME"] = "1"
        cmd = make_command(env)
        print("ftmpi-run:", shlex.join(cmd), flush=True)
        attempt = Attempt(
            number=len(report.attempts),
            command=cmd,
            kill=env["FTMPI_KILL"],
            resume=int(env.get("FTMPI_RESUME", "0")),
            started=time.time(),
        )
        run_attempt(attempt, process_env(env), report.run_dir)
        if report.attempts:
            reached = attempt.first_output or attempt.ended
            attempt.lost_seconds = round(reached - report.attempts[-1].ended, 3)
        report.attempts.append(attempt)
        report.write()
        if attempt.returncode == 0:
            break
        if is_finished(report.run_dir):
            print(
                f"ftmpi-run: the job exited with status {attempt.returncode} after its trainer "
                "wrote summary.json; training finished, so it is not relaunched",
                flush=True,
            )
            break
        if report.restarts >= report.max_restarts:
            break
        fired = logged_kills(report.run_dir, attempt.started, attempt.ended + 1.0)
        remaining = remaining_schedule(remaining, fired, job_start=job_start, now=time.time())
        print(
            f"ftmpi-run: the job exited with status {attempt.returncode}; restart "
            f"{report.restarts + 1} of {report.max_restarts} resumes from the newest snapshot "
            f"(FTMPI_RESUME=1); kills still to carry out: {format_schedule(remaining) or 'none'}",
            flush=True,
        )
    return report


def run_attempt(attempt: Attempt, env: Mapping[str, str], run_dir: str) -> None:
    """Run ``attempt.command``, copying its output through line by line; fill in the exit
    status, end time, first-output time and the kills its ranks reported (each also logged as a
    ``kill`` event in ``run_dir``). A ``SIGTERM`` to the launcher is passed on to the job."""
    proc = subprocess.Popen(
        attempt.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env)
    )
    lock = threading.Lock()

    def pump(src: IO[bytes], dst: IO[bytes]) -> None:
        pending = b""
        while chunk := src.read1(1 << 16):  # type: ignore[attr-defined]
            with lock:
                if attempt.first_output is None:
                    attempt.first_output = time.time()
            dst.write(chunk)  # passed on at once: progress bars end lines with \r, not \n
            dst.flush()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in (raw.decode(errors="replace") for raw in lines):
                if log_injected(run_dir, line) is not None:
                    with lock:
                        attempt.injected.append(line.strip())

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, sys.stdout.buffer), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, sys.stderr.buffer), daemon=True),
    ]
    for t in threads:
        t.start()
    previous = _forward_sigterm(proc)
    try:
        attempt.returncode = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        attempt.returncode = proc.wait()
        raise
    finally:
        attempt.ended = time.time()
        for t in threads:
            t.join(timeout=5)
        if previous is not None:  # None: a handler not set from Python, left as it is
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, previous)


def _forward_sigterm(proc: subprocess.Popen[bytes]) -> Any:
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        return signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    return signal.getsignal(signal.SIGTERM)
