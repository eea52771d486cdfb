"""What reaches the user's terminal from a job: Open MPI's recovery noise goes to the run's log.

During a recovery ftmpi handles, Open MPI, PMIx and Horovod print lines that read like errors:
``NBC_Progress: an error 77 was found during schedule ...`` (a collective broken by the death),
Horovod's ``MPI_AllReduce failed``, ``PMIX ERROR: ...`` on every ``MPI_Comm_spawn``, prterun's
block about a rank that ``exited on signal 9 (Killed)`` when that rank was a replacement ftmpi
then replaced again, the ``ftmpi: injected failure`` line of a rank that dies on schedule (ftmpi's
own one-line failure message follows from the coordinating worker), and, when a rank's uncaught
exception ended the job (``fatal.json``), Open MPI's ``MPI_ABORT was invoked`` block (ftmpi has
printed the error). :class:`OutputFilter` keeps those out of the terminal; everything the job
prints, both streams, goes to ``<run_dir>/job.log`` in order. Anything else Open MPI prints
still reaches the user.

Open MPI's banners are blocks between two lines of dashes; a block is held until it closes (or
:data:`MAX_BLOCK` lines, or the end of the output) and then shown or logged whole.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import IO

NOISE = (
    re.compile(r"NBC_Progress: an error \d+ was found"),
    re.compile(r"MPI_AllReduce failed|MPI_Allreduce failed|Horovod.*has been shut down"),
    re.compile(r"PMIX ERROR: "),
    re.compile(r"ftmpi: injected failure: "),
)
"""Single lines that are recovery noise (the blank line after one is noise too)."""

_DASHES = re.compile(r"^-{20,}\s*$")
_KILLED = re.compile(r"with PID (\d+) on node \S+ exited on\s+signal 9 \(Killed\)", re.S)
_ABORT = "MPI_ABORT was invoked"
_PID = re.compile(r"\(pid (\d+)\)")
MAX_BLOCK = 40
"""Lines of a banner held back at most; a longer one is shown as it comes."""


class OutputFilter:
    """Route one job's output lines: :meth:`feed` returns the text to show (possibly empty).

    ``handled`` holds the pids of ranks whose death ftmpi handles (every injected kill seen on
    either stream is added); ``fatal`` answers whether a rank's uncaught exception ended the
    job. One filter per stream; they share the log, its lock and ``handled``."""

    def __init__(
        self,
        log: IO[str] | None,
        lock: threading.Lock,
        *,
        handled: set[int],
        fatal: Callable[[], bool],
    ) -> None:
        self.log = log
        self.lock = lock
        self.handled = handled
        self.fatal = fatal
        self.block: list[str] | None = None
        self.after_noise = False

    def feed(self, line: str) -> str:
        """Take one line (with its newline, if it had one); return what to show now."""
        self._log(line)
        if self.block is not None:
            self.block.append(line)
            if _DASHES.match(line) or len(self.block) >= MAX_BLOCK:
                return self._close_block()
            return ""
        if _DASHES.match(line):
            self.block = [line]
            return ""
        if line.strip() == "" and self.after_noise:
            self.after_noise = False
            return ""
        self.after_noise = any(p.search(line) for p in NOISE)
        if self.after_noise:
            pid = _PID.search(line)
            if pid and "injected failure" in line:
                self.handled.add(int(pid.group(1)))
            return ""
        return line

    def flush(self) -> str:
        """End of the output: what is still held back, shown."""
        if self.block is None:
            return ""
        return self._close_block()

    def _close_block(self) -> str:
        block, self.block = self.block or [], None
        text = "".join(block)
        killed = _KILLED.search(text)
        noise = bool(killed and int(killed.group(1)) in self.handled)
        noise = noise or (_ABORT in text and self.fatal())
        self.after_noise = noise  # Open MPI ends some banners with a line of blanks
        return "" if noise else text

    def _log(self, line: str) -> None:
        if self.log is None:
            return
        with self.lock:
            self.log.write(line)
            if line.endswith("\n"):
                self.log.flush()


def open_log(run_dir: str) -> IO[str] | None:
    """``<run_dir>/job.log`` for appending (0640), or ``None`` if it cannot be opened."""
    try:
        os.makedirs(run_dir, mode=0o750, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        fd = os.open(os.path.join(run_dir, "job.log"), flags, 0o640)
    except OSError:
        return None
    return os.fdopen(fd, "a", buffering=1, errors="replace")
