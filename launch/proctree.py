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
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # the command name (field 2) may hold spaces: the parent pid follows its ")"
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid``'s process group, its descendants and itself."""
    below = descendants(pid) if Path("/proc/self/stat").exists() else []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for p in [*below, pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)
