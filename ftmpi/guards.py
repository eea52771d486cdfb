"""Guards for MPI calls that a rank's death can break or hang (ULFM).

:func:`failures` turns the process-failure and revoked error classes raised by a recovery's own
MPI calls into :class:`~ftmpi.wire.PeerFailure`, so the caller starts the recovery over;
:func:`deadline` bounds a call that cannot be cancelled (``Shrink``, ``Spawn``, ``Merge``,
``Accept``/``Connect``): past ``config.timeout`` the process says so and exits with
:data:`STUCK_EXIT`, so the job ends instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

from mpi4py import MPI

from ftmpi import events
from ftmpi.config import Config
from ftmpi.runtime import durable_state
from ftmpi.wire import PeerFailure

FAILURE_CLASSES = frozenset({MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED})
"""MPI error classes that mean a peer died or a communicator was revoked (ULFM)."""


@contextlib.contextmanager
def failures(what: str) -> Iterator[None]:
    """Turn an MPI error of the process-failure or revoked class raised inside the block into
    :class:`~ftmpi.wire.PeerFailure` (``what`` names the call), so a death during a recovery's
    own MPI calls (Shrink, Split, Split_type, Spawn, Merge, Agree) makes the caller start the
    recovery over instead of ending the rank. Any other MPI error propagates unchanged."""
    try:
        yield
    except MPI.Exception as exc:
        if exc.Get_error_class() in FAILURE_CLASSES:
            raise PeerFailure(what, exc.Get_error_class()) from exc
        raise


@contextlib.contextmanager
def deadline(config: Config, role: str, what: str) -> Iterator[None]:
    """Run an uncancellable MPI call; if it has not returned within ``config.timeout`` seconds,
    record a ``recovery_stuck`` event, say so on stderr and end this process (exit status 75)."""

    def expire() -> None:
        message = (
            f"ftmpi: {role}: {what} did not complete within {config.timeout:g} s (a rank "
            "probably died during it, which Open MPI cannot interrupt); ending this process so "
            "the job stops instead of hanging. " + durable_state(config)
        )
        events.emit(config.run_dir, "recovery_stuck", role=role, what=what)
        print(message, file=sys.stderr, flush=True)
        os._exit(STUCK_EXIT)

    timer = threading.Timer(config.timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


STUCK_EXIT = 75
"""Exit status of a process whose recovery could not complete (:func:`deadline`)."""
