"""Per-rank CPU and memory sampling into the run directory, for experiments and their figures.

With ``FTMPI_SAMPLE_RESOURCES=<seconds>`` set (and a run directory), :func:`start_from_env`
starts one daemon thread per process that appends a row every ``<seconds>`` to
``<run_dir>/resources/rank-<pid>.csv``::

    time,cpu_percent,rss_bytes,role
    1795454603.82,97.5,312451072,worker 0

``time`` is ``time.time()``; ``cpu_percent`` is this process's CPU time (user + system, all
threads) over the wall time since the previous row, times 100 (so one busy core is 100 and the
value can exceed 100); ``rss_bytes`` is the resident set size; ``role`` is ``worker``,
``server N`` (its slot) or ``starting`` (before :func:`ftmpi.init` has assigned one). Each row
is written and flushed at once, so a rank that is killed keeps every row before its death (a
torn last line is skipped by :func:`read_samples`). Sampling never raises into training: an
unreadable value ends the thread with a one-line warning on standard error.
"""

from __future__ import annotations

import csv
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ftmpi.config import ConfigError
from ftmpi.runtime import current

ENV_VAR = "FTMPI_SAMPLE_RESOURCES"
FIELDS = ("time", "cpu_percent", "rss_bytes", "role")
_started = False


def interval_from_env(environ: dict[str, str] | None = None) -> float:
    """Seconds between samples from ``FTMPI_SAMPLE_RESOURCES`` (0: sampling off). Raises
    :class:`~ftmpi.config.ConfigError` naming the variable for a value that is not a
    non-negative number."""
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{ENV_VAR}={raw!r} is not a number of seconds; use e.g. 0.5") from None
    if value < 0:
        raise ConfigError(f"{ENV_VAR}={raw!r} is negative; use seconds > 0, or leave it unset")
    return value


def start_from_env(run_dir: str) -> bool:
    """Start this process's sampler if ``FTMPI_SAMPLE_RESOURCES`` is set and ``run_dir`` is not
    empty; returns whether a sampler runs. Idempotent: one sampler per process."""
    global _started
    interval = interval_from_env()
    if _started or not interval or not run_dir:
        return _started
    _started = True
    path = os.path.join(run_dir, "resources", f"rank-{os.getpid()}.csv")
    thread = threading.Thread(
        target=_sample_loop, args=(path, interval, _current_role), name="ftmpi-resources"
    )
    thread.daemon = True
    thread.start()
    return True


def _current_role() -> str:
    rt = current()
    if rt is None:
        return "starting"
    return f"server {rt.server_index}" if rt.is_server else "worker"  # no MPI call off-thread


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system, all threads), in seconds."""
    t = os.times()
    return t.user + t.system


def rss_bytes() -> int:
    """This process's resident set size in bytes (``/proc/self/statm``; ``psutil`` where
    there is no ``/proc``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far in bytes (``VmHWM`` in
    ``/proc/self/status``; ``ru_maxrss`` where there is no ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _sample_loop(path: str, interval: float, role: Callable[[], str]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True, mode=0o750)
        with open(path, "a", newline="") as f:
            out = csv.writer(f)
            out.writerow(FIELDS)
            last_wall, last_cpu = time.monotonic(), cpu_seconds()
            while True:
                time.sleep(interval)
                wall, cpu = time.monotonic(), cpu_seconds()
                percent = 100.0 * (cpu - last_cpu) / max(wall - last_wall, 1e-9)
                last_wall, last_cpu = wall, cpu
                out.writerow([f"{time.time():.3f}", f"{percent:.1f}", rss_bytes(), role()])
                f.flush()
    except Exception as exc:  # never disturb training; say why sampling stopped
        print(f"ftmpi: resource sampling stopped: {exc!r}", file=sys.stderr, flush=True)


def read_samples(run_dir: str) -> list[dict[str, Any]]:
    """Every sample of a run, oldest first, each with its ``pid`` (from the file name).
    Torn or malformed rows (a rank killed mid-write) are skipped."""
    folder = os.path.join(run_dir, "resources")
    if not os.path.isdir(folder):
        return []
    rows: list[dict[str, Any]] = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("rank-") and name.endswith(".csv")):
            continue
        pid = int(name[len("rank-") : -len(".csv")])
        with open(os.path.join(folder, name), newline="") as f:
            for row in csv.DictReader(f):
                try:
                    rows.append(
                        {
                            "pid": pid,
                            "time": float(row["time"]),
                            "cpu_percent": float(row["cpu_percent"]),
                            "rss_bytes": int(row["rss_bytes"]),
                            "role": row["role"] or "starting",
                        }
                    )
                except (KeyError, TypeError, ValueError):
                    continue
    return sorted(rows, key=lambda r: r["time"])
