"""Kill a launched job with everything it started.

``mpirun`` (Open MPI 5) starts ``prterun``, which puts every rank, replacements included, in a
process group of its own; killing the launcher's process group alone can leave ranks running
with no parent. :func:`kill_tree` signals every descendant (read from ``/proc``), then the root.
Linux only; elsewhere it signals the root's process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path


def _processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields of ``/proc/<pid>/stat`` after the command name) of every process: state,
    parent pid, process group, session, ... (the command name may hold spaces, so the fields
    are those after its ``)``)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):
            yield int(stat.parent.name), stat.read_text().rpartition(")")[2].split()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, parents before children."""
    children: dict[int, list[int]] = {}
    for child, fields in _processes():
        with contextlib.suppress(ValueError, IndexError):
            children.setdefault(int(fields[1]), []).append(child)
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def session_members(sid: int) -> list[int]:
    """Every live process of session ``sid`` (``/proc``; empty elsewhere; zombies left out)."""
    members = []
    for pid, fields in _processes():
        with contextlib.suppress(ValueError, IndexError):
            if fields[0] != "Z" and int(fields[3]) == sid:
                members.append(pid)
    return members


def kill_session(sid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every process of session ``sid`` (a launcher started with
    ``start_new_session``): what it left behind once it exited, orphans included, such as the
    ``srun`` that ``prterun`` started its daemons with, still waiting for a lost node. Returns
    the pids signalled."""
    members = session_members(sid)
    for p in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
    return members


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid``'s process group, its descendants and itself."""
    below = descendants(pid) if Path("/proc/self/stat").exists() else []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for p in [*below, pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
