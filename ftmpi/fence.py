"""Fencing by attempt: ranks of an older attempt of a run never write over a newer one's state.

``ftmpi-run`` starts every attempt of a run (the first launch, each relaunch) with
``FTMPI_ATTEMPT=N`` and first writes ``N`` to ``<run_dir>/attempt``. A rank of an older attempt
can outlive it: a node whose link was cut keeps its processes while Open MPI's runtime ends the
job and the launcher relaunches on the other nodes. Such a rank must not write what the newer
attempt would take for its own: a snapshot in the shared checkpoint directory, the run's
summary or its fatal record. Those writers ask :func:`superseded` first and write nothing when
a newer attempt has started. A job started without ``ftmpi-run`` (no attempt file) is never
fenced.
"""

from __future__ import annotations

import contextlib
import os

ATTEMPT = "attempt"
"""The run directory's file holding the number of the newest attempt ``ftmpi-run`` started."""


def newest_attempt(run_dir: str) -> int | None:
    """The newest attempt started in ``run_dir`` (``None`` when no launcher recorded one)."""
    with contextlib.suppress(OSError, ValueError), open(os.path.join(run_dir, ATTEMPT)) as f:
        return int(f.read().strip())
    return None


def superseded(run_dir: str, attempt: int) -> int | None:
    """The newer attempt that supersedes ``attempt`` of the run in ``run_dir``, or ``None``
    while ``attempt`` is the newest (or no attempt was recorded). Never raises."""
    newest = newest_attempt(run_dir) if run_dir else None
    return newest if newest is not None and newest > attempt else None


def start_attempt(run_dir: str, attempt: int) -> None:
    """Record ``attempt`` as the run's newest (the launcher, before it starts the attempt);
    written atomically, so a rank reads the old number or the new one."""
    os.makedirs(run_dir, mode=0o750, exist_ok=True)
    tmp = os.path.join(run_dir, f".{ATTEMPT}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{attempt}\n")
    os.replace(tmp, os.path.join(run_dir, ATTEMPT))


def fenced_message(what: str, attempt: int, newer: int) -> str:
    """One line for a write refused by the fence."""
    return (
        f"not writing {what}: this is attempt {attempt} of the run, and attempt {newer} has "
        "started since (a relaunch after this rank's node was lost or cut off)"
    )
