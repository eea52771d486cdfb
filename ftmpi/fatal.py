"""A rank whose Python raised ends the job: it is a bug or a user error, not a rank to recover.

ULFM makes a rank that exits look like a dead rank, so without this module an uncaught exception
on one worker printed its traceback and then left the others waiting for it until their timeout.
:func:`install` (called by ``ftmpi.init()``) replaces ``sys.excepthook`` and
``threading.excepthook``. On an uncaught exception, :func:`end_job`:

1. sets :data:`raised` (what the run record reads: this worker did not finish);
2. claims ``<run_dir>/fatal.json`` (created with ``O_EXCL``: the first rank to fail wins) with the
   rank, role, exception type, message and time, and records a ``rank_raised`` event;
3. prints the traceback once, each line prefixed with the rank and role; a rank that raises the
   same error after another one did prints nothing more, one with another error prints one line.
   A :class:`UserError` (bad input: a configuration, another model's snapshot, a storage
   problem) prints as one line, without a traceback;
4. aborts the whole job (``MPI_Abort`` on the widest communicator ftmpi holds), so every rank,
   on every node, is gone within seconds, with exit status :data:`RAISED_EXIT`
   (:data:`USER_ERROR_EXIT` for a :class:`UserError`).

An error raised before ``init`` has a runtime (a configuration every rank refuses alike) is
shown and recorded the same way, without the abort: each rank then exits on its own.
``KeyboardInterrupt`` ends the process quietly (status 130).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, TypedDict, cast

from ftmpi import events
from ftmpi.fence import superseded

if TYPE_CHECKING:
    from ftmpi.runtime import Runtime

FATAL = "fatal.json"
RAISED_EXIT = 1
"""Exit status of a job that a rank's uncaught exception ended."""
USER_ERROR_EXIT = 2
"""Exit status of a job that a :class:`UserError` ended (as for bad command-line input)."""

raised = False
"""Whether this process raised an uncaught exception (it did not finish training)."""


class UserError(Exception):
    """Bad input that training cannot get past: the message names the value and the fix.

    Ends the job like any uncaught exception, but prints as one line, without a traceback."""


USER_ERRORS = ("ConfigError", "SnapshotError")
"""Exception classes, besides :class:`UserError`, whose message says all (value and fix)."""


class FatalRecord(TypedDict):
    """``fatal.json``: the job's first uncaught exception (also the ``rank_raised`` event)."""

    rank: int | None
    """World rank of the process, ``None`` before the runtime existed."""
    role: str
    type: str
    """The exception's class name."""
    message: str
    user_error: bool
    """Printed as one line, without a traceback (:class:`UserError`, :data:`USER_ERRORS`)."""
    time: float
    pid: int


_rt: Runtime | None = None
_installed = False


def install(rt: Runtime | None = None) -> None:
    """Route uncaught exceptions (main thread and others) to :func:`end_job`. Idempotent;
    call again with the runtime once it exists, so the message names the role."""
    global _rt, _installed
    if rt is not None:
        _rt = rt
    if _installed:
        return
    _installed = True
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    end_job(exc, tb)


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or isinstance(args.exc_value, SystemExit):
        return
    end_job(args.exc_value, args.exc_traceback, thread=getattr(args.thread, "name", None))


def who(rt: Runtime | None) -> tuple[str, int | None]:
    """``("worker 1", world_rank)`` or ``("server 0", ...)``; from the launcher's environment
    before the runtime exists."""
    if rt is not None:
        try:
            return rt.role, rt.world_rank
        except Exception:  # a freed or broken communicator
            return ("server" if rt.is_server else "worker"), None
    rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMIX_RANK")
    return "rank", int(rank) if rank and rank.isdigit() else None


def end_job(
    exc: BaseException, tb: TracebackType | None = None, *, thread: str | None = None
) -> None:
    """Record ``exc`` as the job's fatal error, show it once and abort the whole job. Before
    the runtime exists (``init`` refused its configuration, which every rank reads alike), the
    main thread returns instead, so the interpreter exits with status 1 as usual."""
    global raised
    raised = True
    if isinstance(exc, KeyboardInterrupt):
        _flush()
        os._exit(130)
    rt = _rt
    role, rank = who(rt)
    where = f"{role} (rank {rank})" if rank is not None else role
    if thread and thread != "MainThread":
        where += f", thread {thread}"
    user_error = isinstance(exc, UserError) or type(exc).__name__ in USER_ERRORS
    message = str(exc)
    record: FatalRecord = {
        "rank": rank,
        "role": role,
        "type": type(exc).__name__,
        "message": message,
        "user_error": user_error,
        "time": round(time.time(), 6),
        "pid": os.getpid(),
    }
    run_dir = _run_dir(rt)
    first, earlier = claim(run_dir, record)
    with contextlib.suppress(Exception):
        events.emit(run_dir, "rank_raised", **{k: v for k, v in record.items() if k != "pid"})
    prefix = f"[ftmpi {where}] "
    if first:
        if user_error:
            text = f"ftmpi: error on {where}: {type(exc).__name__}: {message}\n"
        else:
            lines = traceback.format_exception(type(exc), exc, tb)
            text = "".join(prefix + line for chunk in lines for line in chunk.splitlines(True))
        sys.stderr.write(text)
    elif earlier is None or (earlier.get("type"), earlier.get("message")) != (
        record["type"],
        message,
    ):
        sys.stderr.write(f"{prefix}also raised {type(exc).__name__}: {message}\n")
    _flush()
    if rt is None and not thread:
        return  # before the runtime: every rank raises the same; they exit, MPI finalized
    abort(rt, USER_ERROR_EXIT if user_error else RAISED_EXIT)


def claim(run_dir: str, record: FatalRecord) -> tuple[bool, FatalRecord | None]:
    """Write ``record`` to ``<run_dir>/fatal.json`` unless a rank already did; returns whether
    this call wrote it, and the record there. Without a run directory every caller is first."""
    if not run_dir:
        return True, None
    attempt = _rt.config.attempt if _rt is not None else 0
    if superseded(run_dir, attempt) is not None:
        return True, None  # a newer attempt runs: its record is not this rank's to write
    path = os.path.join(run_dir, FATAL)
    try:
        os.makedirs(run_dir, mode=0o750, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    except FileExistsError:
        return False, read_fatal(run_dir)
    except OSError:
        return True, None
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, sort_keys=True)
        f.write("\n")
    return True, record


def read_fatal(run_dir: str) -> FatalRecord | None:
    """The fatal error recorded in ``run_dir``, if any (``None`` when absent or unreadable; a
    record written by another version may lack fields: read them with ``.get``)."""
    try:
        with open(os.path.join(run_dir, FATAL)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return cast(FatalRecord, doc) if isinstance(doc, dict) else None


def abort(rt: Runtime | None, code: int) -> NoReturn:
    """End every rank of the job with ``code``: ``MPI_Abort`` on the widest communicator this
    process holds (the world, which after a re-spawn spans the replacements too). Without MPI,
    exit this process."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        comm = rt.world if rt is not None else mpi.COMM_WORLD
        with contextlib.suppress(Exception):
            comm.Abort(code)
        with contextlib.suppress(Exception):
            mpi.COMM_WORLD.Abort(code)
    os._exit(code)


def _run_dir(rt: Runtime | None) -> str:
    if rt is not None:
        return rt.config.run_dir
    return os.environ.get("FTMPI_RUN_DIR", "")


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
