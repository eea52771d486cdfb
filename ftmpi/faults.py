"""Failure injection: a rank SIGKILLs itself at a scheduled step or time.

A schedule is a list of specs ``ROLE[:INDEX]@WHEN`` (``FTMPI_KILL``, comma-separated), with
ROLE ``server`` or ``worker`` (INDEX counts ranks of that role), or ``head`` or ``tail`` (INDEX
is a shard: the server at the head or tail of that shard's chain when the kill is due; without
a chain strategy every shard has one server, which is both). WHEN is ``step=N`` (a server:
after applying its N-th update; a worker: at the start of its N-th step) or ``Ns`` (N seconds
after the job started). The rank kills itself (no cleanup code runs), so this works across
nodes without ssh.

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
from collections.abc import Callable
from dataclasses import dataclass

ROLES = ("server", "worker", "head", "tail")
SHARD_ROLES = ("head", "tail")
"""Roles whose index names a shard (``servers // chain_length`` with a chain, else ``servers``)."""
FORM = "ROLE[:INDEX]@step=N or ROLE[:INDEX]@SECONDSs, e.g. server:0@step=50 or worker:1@30s"
_SPEC = re.compile(r"^(?P<target>[^@]*)@(?P<when>.*)$")
_TARGET = re.compile(r"^(?P<role>[A-Za-z_+-]+)(?::(?P<index>[^:]*))?$")
_STEP = re.compile(r"^step=(?P<step>[+-]?\d+)$")
_SECS = re.compile(r"^(?P<secs>[+-]?\d+(?:\.\d+)?)s$")


@dataclass(frozen=True)
class KillSpec:
    role: str
    index: int
    step: int | None = None
    seconds: float | None = None

    def __str__(self) -> str:
        when = f"step={self.step}" if self.step is not None else f"{self.seconds:g}s"
        return f"{self.role}:{self.index}@{when}"


def parse_spec(raw: str) -> KillSpec:
    """Parse one ``ROLE[:INDEX]@WHEN``. Raises ``ValueError`` naming the spec, the part that is
    wrong (role, index or WHEN) and the accepted form."""
    m = _SPEC.match(raw)
    target = _TARGET.match(m["target"]) if m else None
    if not m or not target:
        raise ValueError(f"kill spec {raw!r} is not {FORM}")
    role = target["role"]
    if role not in ROLES:
        raise ValueError(f"kill spec {raw!r}: unknown role {role!r}; use one of {list(ROLES)}")
    index_text = target["index"]
    if index_text is not None and not index_text.isdigit():
        raise ValueError(
            f"kill spec {raw!r}: index {index_text!r} is not a whole number >= 0; "
            f"e.g. {role}:0@{m['when'] or 'step=50'}"
        )
    when = m["when"]
    step_m, secs_m = _STEP.match(when), _SECS.match(when)
    if step_m:
        step = int(step_m["step"])
        if step < 1:
            raise ValueError(f"kill spec {raw!r}: step must be >= 1, got step={step}")
        return KillSpec(role, int(index_text or 0), step=step)
    if secs_m:
        secs = float(secs_m["secs"])
        if secs < 0:
            raise ValueError(f"kill spec {raw!r}: time {when!r} is negative; use seconds >= 0")
        return KillSpec(role, int(index_text or 0), seconds=secs)
    raise ValueError(
        f"kill spec {raw!r}: WHEN {when!r} is neither step=N (N >= 1) nor SECONDSs; "
        "e.g. step=200 or 30s"
    )


def parse_schedule(text: str) -> list[KillSpec]:
    """Parse ``FTMPI_KILL`` (comma-separated specs, blanks ignored). Raises ``ValueError``
    naming the bad spec and the accepted form."""
    return [parse_spec(raw) for raw in (p.strip() for p in text.split(",")) if raw]


def format_schedule(specs: list[KillSpec]) -> str:
    """The ``FTMPI_KILL`` text of ``specs`` (inverse of :func:`parse_schedule`)."""
    return ",".join(str(s) for s in specs)


def check_schedule(
    specs: list[KillSpec],
    *,
    workers: int,
    servers: int,
    shards: int | None = None,
    steps: int | None = None,
    updates: int | None = None,
    duration: float | None = None,
) -> None:
    """Refuse specs naming ranks or shards that do not exist, or due after the run's end.

    ``shards`` (default ``servers``) bounds the index of ``head``/``tail`` specs. When the run's
    length is known, ``steps`` (worker steps) bounds worker specs, ``updates`` (updates a
    server applies; default ``steps``, in async mode ``steps * workers``) bounds server, head
    and tail specs, and ``duration`` (seconds) bounds time-scheduled specs: a kill at or after
    the end would never happen. Raises ``ValueError`` naming the spec and the valid range.
    """
    counts = {"worker": workers, "server": servers}
    shards = servers if shards is None else shards
    updates = steps if updates is None else updates
    for s in specs:
        count = counts.get(s.role, shards)
        if s.index >= count:
            kind = "shard" if s.role in SHARD_ROLES else f"{s.role} rank"
            valid = f"indices 0..{count - 1}" if count else "none to kill"
            raise ValueError(f"kill spec {s}: there are {count} {kind}(s), {valid}")
        end = steps if s.role == "worker" else updates
        if end is not None and s.step is not None and s.step >= end:
            what = "steps" if s.role == "worker" else "updates per server"
            raise ValueError(
                f"kill spec {s}: step={s.step} is not before the run's end at {end} {what}; "
                f"use a step in 1..{end - 1}"
            )
        if duration is not None and s.seconds is not None and s.seconds >= duration:
            raise ValueError(
                f"kill spec {s}: {s.seconds:g}s is not before the run's end at {duration:g} s; "
                f"use a time below {duration:g}s"
            )


def die(reason: str, *, spec: object = None, run_dir: str = "") -> None:
    """Record the kill (event ``kill`` with ``str(spec)``), then SIGKILL this process now."""
    print(f"ftmpi: injected failure: {reason} (pid {os.getpid()})", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if spec is not None:
        from ftmpi import events

        events.emit(run_dir, "kill", spec=str(spec), source="rank")
    os.kill(os.getpid(), signal.SIGKILL)


def fired_before(run_dir: str, spec: object) -> bool:
    """Whether the run's event log already records a kill of ``spec``."""
    from ftmpi.events import read_events

    return any(e["event"] == "kill" and e.get("spec") == str(spec) for e in read_events(run_dir))


ChainPosition = Callable[[], tuple[int, bool, bool]]
"""() -> (shard, is_head, is_tail) of a chain member at this moment."""


class Injector:
    """The kill specs this process carries out.

    ``role``/``index`` specs (``server:1``, ``worker:0``) name a rank slot: the slot's n-th
    spec is carried out by its n-th incarnation (``incarnation``; a replacement takes the next).
    ``head``/``tail`` specs name a position in shard ``index``'s chain: whichever server holds it
    when the spec's time or step comes dies, once per run (a spec already in the run's event log
    as a ``kill`` is not carried out again). A time already past when a replacement starts is
    carried out at once for slot specs, never for position specs.
    """

    def __init__(
        self,
        specs: list[KillSpec],
        role: str,
        index: int,
        incarnation: int,
        job_start: float,
        *,
        run_dir: str = "",
        chain_position: ChainPosition | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.chain_position = chain_position
        self._last_step = 0
        mine = [s for s in specs if s.role == role and s.index == index]
        self.spec = mine[incarnation] if incarnation < len(mine) else None
        self.positional = [s for s in specs if s.role in ("head", "tail")] if chain_position else []
        if self.spec is not None and self.spec.seconds is not None:
            self._timer(max(0.0, job_start + self.spec.seconds - time.time()), self.spec)
        for s in self.positional:
            if s.seconds is not None and job_start + s.seconds > time.time():
                self._timer(job_start + s.seconds - time.time(), s)

    def _timer(self, delay: float, spec: KillSpec) -> None:
        timer = threading.Timer(delay, self._fire, args=(spec, "by time"))
        timer.daemon = True
        timer.start()

    def _holds(self, spec: KillSpec) -> bool:
        if spec.role not in ("head", "tail"):
            return True
        assert self.chain_position is not None
        shard, head, tail = self.chain_position()
        return shard == spec.index and (head if spec.role == "head" else tail)

    def _fire(self, spec: KillSpec, how: str) -> None:
        if not self._holds(spec):
            return
        if spec.role in ("head", "tail") and fired_before(self.run_dir, spec):
            return
        die(f"{spec} ({how})", spec=spec, run_dir=self.run_dir)

    def at_step(self, step: int) -> None:
        """Called with the step (or server version) just reached; dies if the schedule says so.
        A spec's step counts as reached when it is passed (a replayed gradient log advances a
        server's version by many at once)."""
        last, self._last_step = self._last_step, step
        for spec in [self.spec, *self.positional]:
            if spec is not None and spec.step is not None and last < spec.step <= step:
                self._fire(spec, f"step {spec.step}")
