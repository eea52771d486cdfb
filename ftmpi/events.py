"""Recovery events with timestamps, one JSON line each, in ``<run_dir>/events.jsonl``.

Every rank appends to the same file; each event is one ``write()`` of a line opened with
``O_APPEND``, which the kernel keeps whole on a local file system. Without a run directory the
events go to standard error only when ``FTMPI_VERBOSE`` is set.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def emit(run_dir: str, event: str, **fields: Any) -> dict[str, Any]:
    """Record ``event`` (e.g. ``failure_detected``) with this process's pid and a timestamp."""
    rec = {"time": round(time.time(), 6), "event": event, "pid": os.getpid(), **fields}
    line = json.dumps(rec, sort_keys=True, default=str) + "\n"
    if run_dir:
        os.makedirs(run_dir, exist_ok=True, mode=0o750)
        fd = os.open(
            os.path.join(run_dir, "events.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640
        )
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    if os.environ.get("FTMPI_VERBOSE"):
        print("ftmpi event:", line.strip(), file=sys.stderr, flush=True)
    return rec


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """All events of a run, oldest first. A line that is not a whole event (a write torn by a
    rank killed mid-line, or on a shared filesystem that does not keep appends whole) is
    skipped, so one bad line never hides the rest of the log."""
    path = os.path.join(run_dir, "events.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("time"), (int, float)):
                out.append(event)
    return sorted(out, key=lambda e: e["time"])
