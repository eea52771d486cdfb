"""Failure-injection schedules on the launcher side: ``--kill`` flags, seeded random kills, and
the part of a schedule a relaunch must still carry out.

The job receives the schedule as ``FTMPI_KILL`` (parsed and carried out by ``ftmpi.faults``).
Time-scheduled kills count from ``FTMPI_JOB_START``, which the launcher sets once and keeps
across relaunches, so ``30s`` means 30 s after the first launch.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ftmpi import events
from ftmpi.events import read_events
from ftmpi.faults import SHARD_ROLES, KillSpec, parse_spec

_INJECTED = re.compile(r"ftmpi: injected failure: (?P<spec>\S+).*?(?:\(pid (?P<pid>\d+)\))?$")


def parse_kill_flags(values: Iterable[str]) -> list[KillSpec]:
    """The specs of repeated ``--kill ROLE[:INDEX]@WHEN`` flags (a flag may also hold several,
    comma-separated). Raises ``ValueError`` naming the flag value and what is wrong."""
    specs = []
    for value in values:
        for raw in (p.strip() for p in value.split(",")):
            if not raw:
                continue
            try:
                specs.append(parse_spec(raw))
            except ValueError as exc:
                raise ValueError(f"--kill {value}: {exc}") from None
    return specs


def random_schedule(
    count: int,
    seed: int,
    *,
    workers: int,
    servers: int,
    steps: int | None = None,
    updates: int | None = None,
    duration: float | None = None,
) -> list[KillSpec]:
    """``count`` kills at seeded random roles, indices and times within the run's length.

    Times are steps (``step=N``, N in 1..steps-1 for workers, 1..updates-1 for servers) when
    ``steps`` is known, else seconds within ``duration``. Server slots may die repeatedly (a
    replacement is killed by a later spec); each worker is killed at most once, and at least one
    worker survives. The schedule is in time order, so the k-th kill of a slot is carried out by
    its k-th incarnation. The same arguments give the same schedule. Raises ``ValueError`` if
    the run's length is unknown or nothing can be killed.
    """
    if count < 0:
        raise ValueError(f"--random-kills {count} is negative; use a count >= 0")
    if count == 0:
        return []
    if steps is None and duration is None:
        raise ValueError(
            f"--random-kills {count} needs the run's length to place kills in: "
            "pass --steps N or --duration SECONDS"
        )
    updates = steps if updates is None else updates
    if steps is not None and min(steps, updates or 0) < 2:
        raise ValueError(f"--steps {steps} leaves no step to kill at; use --steps >= 2")
    if duration is not None and steps is None and duration <= 0:
        raise ValueError(f"--duration {duration:g} must be positive")
    rng = random.Random(seed)
    free_workers = list(range(workers))
    rng.shuffle(free_workers)
    specs = []
    for _ in range(count):
        roles = (["server"] if servers else []) + (["worker"] if len(free_workers) > 1 else [])
        if not roles:
            raise ValueError(
                f"--random-kills {count}: after {len(specs)} kill(s) no rank is left to kill "
                f"(servers={servers}, every worker but one already killed); ask for fewer"
            )
        role = rng.choice(roles)
        index = rng.randrange(servers) if role == "server" else free_workers.pop()
        if steps is not None:
            end = steps if role == "worker" else updates
            assert end is not None
            specs.append(KillSpec(role, index, step=rng.randint(1, end - 1)))
        else:
            assert duration is not None
            secs = min(round(rng.uniform(0.0, duration), 1), round(duration * 0.99, 2))
            specs.append(KillSpec(role, index, seconds=secs))
    return sorted(specs, key=lambda s: s.step if s.step is not None else s.seconds or 0.0)


def kill_flags_text(specs: Sequence[KillSpec]) -> str:
    """``--kill A --kill B``: the flags that replay ``specs``."""
    return " ".join(f"--kill {s}" for s in specs)


def injected_in(line: str) -> tuple[KillSpec, int | None] | None:
    """The spec (and pid) a rank reported carrying out on this output line, from the
    ``ftmpi: injected failure: SPEC ... (pid N)`` line of ``ftmpi.faults.die``."""
    m = _INJECTED.search(line)
    if not m:
        return None
    try:
        return parse_spec(m["spec"]), int(m["pid"]) if m["pid"] else None
    except ValueError:
        return None


def log_injected(run_dir: str, line: str) -> KillSpec | None:
    """Record a ``kill`` event (``source: launcher``) for an injected-failure line a rank
    printed; returns its spec, or ``None`` for any other line. The event's time is when the
    launcher read the line: it trails the death by the output-forwarding delay (milliseconds,
    more on a loaded machine), so a ``kill`` event the dying rank logged itself is the one to
    order against other events."""
    found = injected_in(line)
    if found is None:
        return None
    spec, pid = found
    events.emit(run_dir, "kill", spec=str(spec), pid=pid, source="launcher")
    return spec


def kill_events(log: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], KillSpec]]:
    """The distinct ``kill`` events of an event log with their specs: a kill that both the
    dying rank and the launcher logged (same pid and spec) counts once."""
    seen: set[tuple[Any, str]] = set()
    out = []
    for e in log:
        spec = _spec_of_event(e) if e.get("event") == "kill" else None
        if spec is None:
            continue
        key = (e.get("pid"), str(spec))
        if e.get("pid") is None or key not in seen:
            seen.add(key)
            out.append((e, spec))
    return out


def logged_kills(run_dir: str, since: float, until: float) -> list[KillSpec]:
    """The kills carried out between ``since`` and ``until``, from the distinct ``kill``
    events in ``<run_dir>/events.jsonl``."""
    return [
        spec
        for e, spec in kill_events(read_events(run_dir))
        if since <= float(e.get("time", 0.0)) <= until
    ]


def _spec_of_event(event: dict[str, Any]) -> KillSpec | None:
    try:
        if isinstance(event.get("spec"), str):
            return parse_spec(event["spec"])
        step, secs = event.get("step"), event.get("seconds")
        return KillSpec(
            str(event["role"]),
            int(event.get("index", 0)),
            step=int(step) if step is not None else None,
            seconds=float(secs) if secs is not None and step is None else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


def remaining_schedule(
    schedule: Sequence[KillSpec], fired: Iterable[KillSpec], *, job_start: float, now: float
) -> list[KillSpec]:
    """What a relaunch must still carry out: ``schedule`` without the kills that ``fired``
    (each fired kill removes one matching entry, earliest first; a fired server kill matches a
    ``head``/``tail`` entry with the same WHEN if no entry names it exactly) and without
    time-scheduled kills already due (``job_start + seconds <= now``), which would otherwise
    fire at once in the relaunched job."""
    left = list(schedule)
    for spec in fired:
        i = _match(left, spec)
        if i is not None:
            del left[i]
    return [s for s in left if s.seconds is None or job_start + s.seconds > now]


def _match(schedule: Sequence[KillSpec], fired: KillSpec) -> int | None:
    for i, s in enumerate(schedule):
        if s == fired:
            return i
    for i, s in enumerate(schedule):
        same_when = (s.step, s.seconds) == (fired.step, fired.seconds)
        if same_when and s.role in SHARD_ROLES and fired.role == "server":
            return i
    return None
