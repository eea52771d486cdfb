"""Failpoints: a rank SIGKILLs itself at a named place in the code, deterministically.

Kill schedules (:mod:`ftmpi.faults`) hit a step or a time; a failpoint hits a *moment*: while a
push is in flight, half-way through a snapshot write, during a chain reconfiguration. Arm them
with ``FTMPI_FAILPOINTS`` (comma-separated) as ``NAME@ROLE[:INDEX][#HIT]``: the rank in that
role dies the HIT-th time (default 1) it passes ``NAME``. ROLE is ``server``/``worker`` (a rank
slot; only its original incarnation is armed) or ``head``/``tail`` (INDEX is a shard: whichever
server holds that chain position when it passes ``NAME``; once per run, as with kill specs).

The places (:data:`PLACES`):

- ``push``: a worker has sent its gradients and not yet received the new weights;
- ``pull``: a worker has asked for weights and not yet received them;
- ``apply``: a server has applied an update and not yet answered it;
- ``forward``: a chain member has started forwarding updates and not yet applied them;
- ``answered``: a chain head has applied a push and handled its answer (sent it, with
  ``tail`` ack, when every earlier update is committed), and not yet forwarded it;
- ``snapshot_write``: a snapshot's temporary file is written and fsynced, not yet renamed;
- ``reconfigure``: a chain member is in a new view and has not yet re-sent its updates;
- ``state_transfer``: a server has sent the header of a state transfer, not its bytes;
- ``replay``: a replacement has received a gradient log and not yet applied it;
- ``shrunk``: a rank in a recovery has shrunk the world and not yet built the new view's
  communicators (a second death during a recovery);
- ``starting``: a re-spawned process has started and not yet said it is ready to join (role
  ``replacement``, no index: the first replacement of the run to get there dies, as a
  replacement that Open MPI started but that never comes up; :func:`at_start`).

An unarmed failpoint costs one dictionary lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ftmpi.faults import ROLES, die, fired_before

PLACES = (
    "push",
    "pull",
    "apply",
    "forward",
    "answered",
    "snapshot_write",
    "reconfigure",
    "state_transfer",
    "replay",
    "shrunk",
    "starting",
)
STARTING = "starting"
"""The one place a process passes before it has a role (:func:`at_start`)."""
_SPEC = re.compile(r"^(?P<name>[a-z_]+)@(?P<role>[a-z]+)(?::(?P<index>\d+))?(?:#(?P<hit>\d+))?$")
FORM = "NAME@ROLE[:INDEX][#HIT], e.g. apply@server:0#5 or snapshot_write@server:1"


@dataclass(frozen=True)
class Failpoint:
    name: str
    role: str
    index: int
    hit: int = 1

    def __str__(self) -> str:
        return f"{self.name}@{self.role}:{self.index}#{self.hit}"


def parse_failpoints(text: str) -> list[Failpoint]:
    """Parse ``FTMPI_FAILPOINTS``. Raises ``ValueError`` naming the bad entry and the form."""
    out = []
    for raw in (p.strip() for p in text.split(",")):
        if not raw:
            continue
        m = _SPEC.match(raw)
        if not m:
            raise ValueError(f"failpoint {raw!r} is not {FORM}")
        if m["name"] not in PLACES:
            raise ValueError(f"failpoint {raw!r}: unknown place {m['name']!r}; use {list(PLACES)}")
        if (m["name"] == STARTING) != (m["role"] == "replacement"):
            raise ValueError(f"failpoint {raw!r}: use {STARTING}@replacement, and only that")
        if m["role"] not in (*ROLES, "replacement"):
            raise ValueError(f"failpoint {raw!r}: unknown role {m['role']!r}; use {list(ROLES)}")
        hit = int(m["hit"] or 1)
        if hit < 1:
            raise ValueError(f"failpoint {raw!r}: #HIT must be >= 1")
        out.append(Failpoint(m["name"], m["role"], int(m["index"] or 0), hit))
    return out


_armed: dict[str, list[list[Any]]] = {}
"""Place -> [failpoint, passes so far] for this process."""
_position: Callable[[], tuple[int, bool, bool]] | None = None
_run_dir = ""


def arm(
    points: list[Failpoint],
    role: str,
    index: int,
    incarnation: int,
    *,
    run_dir: str = "",
    chain_position: Callable[[], tuple[int, bool, bool]] | None = None,
) -> None:
    """Arm the failpoints that concern this process (``role`` ``index``, ``incarnation``)."""
    global _position, _run_dir
    _armed.clear()
    _position, _run_dir = chain_position, run_dir
    for p in points:
        slot = p.role == role and p.index == index and incarnation == 0
        if slot or (p.role in ("head", "tail") and chain_position is not None):
            _armed.setdefault(p.name, []).append([p, 0])


def at_start(points: list[Failpoint], run_dir: str) -> None:
    """A re-spawned process before it joins (it has no role yet): die at ``starting`` if that
    failpoint is armed and no replacement of this run has died there before."""
    for p in points:
        if p.name == STARTING and not fired_before(run_dir, p):
            die(f"failpoint {p}", spec=p, run_dir=run_dir)


def failpoint(name: str) -> None:
    """Die here if an armed failpoint says so (see the module docstring)."""
    entries = _armed.get(name)
    if not entries:
        return
    for entry in entries:
        p: Failpoint = entry[0]
        if p.role in ("head", "tail"):
            assert _position is not None
            shard, head, tail = _position()
            if shard != p.index or not (head if p.role == "head" else tail):
                continue
        entry[1] += 1
        if entry[1] == p.hit and not (p.role in ("head", "tail") and fired_before(_run_dir, p)):
            die(f"failpoint {p}", spec=p, run_dir=_run_dir)
