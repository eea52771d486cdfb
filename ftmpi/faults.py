"""Failure injection: a rank SIGKILLs itself at a scheduled step or time.

A schedule is a list of specs ``ROLE[:INDEX]@WHEN`` (``FTMPI_KILL``, comma-separated), with
ROLE ``server`` or ``worker`` and WHEN ``step=N`` (a server: after applying its N-th update; a
worker: at the start of its N-th step) or ``Ns`` (N seconds after the job started). The rank
kills itself (no cleanup code runs), so this works across nodes without ssh.

Several specs may name the same rank: the k-th spec for a slot (in schedule order) is carried
out by that slot's k-th incarnation (0 = the original rank, 1 = its first replacement, ...).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass

ROLES = ("server", "worker")
_SPEC = re.compile(
    r"^(?P<role>[a-z]+)(?::(?P<index>\d+))?@(?:step=(?P<step>\d+)|(?P<secs>\d+(?:\.\d+)?)s)$"
)


@dataclass(frozen=True)
class KillSpec:
    role: str
    index: int
    step: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        when = f"step={self.step}" if self.step is not None else f"{self.seconds:g}s"
        return f"{self.role}:{self.index}@{when}"


def parse_schedule(text: str) -> list[KillSpec]:
    """Parse ``FTMPI_KILL``. Raises ``ValueError`` naming the bad spec and the accepted form."""
    specs = []
    for raw in (p.strip() for p in text.split(",")):
        if not raw:
            continue
        m = _SPEC.match(raw)
        if not m or m["role"] not in ROLES:
            raise ValueError(
                f"kill spec {raw!r} is not ROLE[:INDEX]@step=N or ROLE[:INDEX]@SECONDSs with ROLE "
                f"in {list(ROLES)}; e.g. server:0@step=50 or worker:1@30s"
            )
        step = int(m["step"]) if m["step"] is not None else None
        secs = float(m["secs"]) if m["secs"] is not None else None
        if step is not None and step < 1:
            raise ValueError(f"kill spec {raw!r}: step must be >= 1")
        specs.append(KillSpec(m["role"], int(m["index"] or 0), step, secs))
    return specs


def check_schedule(specs: list[KillSpec], *, workers: int, servers: int) -> None:
    """Refuse specs naming ranks that do not exist."""
    for s in specs:
        count = servers if s.role == "server" else workers
        if s.index >= count:
            raise ValueError(
                f"kill spec {s}: there are {count} {s.role} rank(s), indices 0..{count - 1}"
            )


def die(reason: str) -> None:
    """SIGKILL this process now (after flushing what it printed)."""
    print(f"ftmpi: injected failure: {reason} (pid {os.getpid()})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Injector:
    """The kill specs this process (``role`` ``index``, incarnation ``incarnation``) carries out."""

    def __init__(
        self, specs: list[KillSpec], role: str, index: int, incarnation: int, job_start: float
    ) -> None:
        mine = [s for s in specs if s.role == role and s.index == index]
        self.spec = mine[incarnation] if incarnation < len(mine) else None
        if self.spec is not None and self.spec.seconds is not None:
            delay = max(0.0, job_start + self.spec.seconds - time.time())
            timer = threading.Timer(delay, die, args=(f"{self.spec} (by time)",))
            timer.daemon = True
            timer.start()

    def at_step(self, step: int) -> None:
        """Called with the step just reached; dies if the schedule says so."""
        if self.spec is not None and self.spec.step is not None and step == self.spec.step:
            die(f"{self.spec}")
