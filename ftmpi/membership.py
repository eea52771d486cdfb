"""Membership after rank deaths (ULFM): revoke, shrink, re-spawn, new view.

Every survivor runs :func:`recover` when an ftmpi call raised ``PeerFailure``: it revokes the
communicators (so every other rank's pending or next call fails too and joins in), shrinks the
world to the live ranks, marks dead server slots down and drops dead workers, rebuilds the
workers'/servers' sub-communicator and increments the view number. Messages of an older view
travel on a communicator that no longer exists after the view change, so they can never be
matched; headers carry the view too, and a server drops and counts mismatches.

A down server slot is refilled once its down time (``down_for``) has passed, one of two ways
(:mod:`ftmpi.spawning`): where the workers wait for it anyway (``checkpoint`` in server
placement) and for a dead worker's replacement, by :func:`spawn_replacements`, a collective
``MPI_Comm_spawn`` + merge of all survivors inside the recovery; where the workers go on, the
coordinator (worker 0) spawns it on a thread of its own (:func:`request_due_replacements`) and,
once it has started, revokes the world so that every rank joins a recovery that admits it
(:func:`admit_background`: ``MPI_Comm_accept`` + merge). The new process runs the user's
script; its ``ftmpi.init()`` sees a parent and calls :func:`join_as_replacement` instead of
splitting COMM_WORLD. Each replacement is spawned on the
node :func:`ftmpi.placement.replacement_nodes` picks (a spare node first, then a live node
holding no member of its chain, then the least loaded live node; Info key ``host``), and after
the Merge every rank gathers every rank's node again (``Runtime.nodes``; a Shrink renumbers it).

A rank dying during a recovery makes one of the recovery's own MPI calls (``Shrink``,
``Split``, ``Split_type``, ``Spawn``, ``Merge``, ``Agree``) fail on the survivors; every such
call runs under :func:`~ftmpi.guards.failures`, which turns the process-failure and revoked
error classes into ``PeerFailure``, so the caller's retry loop starts the recovery over (the
view number is counted before the new role communicator is built and its outcome is agreed,
so every survivor starts over together and the views still agree).

``Shrink``, ``Spawn`` and ``Merge`` are blocking and cannot be cancelled. ULFM guarantees
``Shrink`` completes among live processes; a rank dying while the others spawn or merge can leave
``Spawn``/``Merge`` waiting forever in Open MPI 5 (open-mpi/ompi#13325, #12585). They run
under :func:`~ftmpi.guards.deadline`: past ``config.timeout`` the process reports it and exits,
so the job ends (and ``ftmpi-run --max-restarts`` or a Slurm requeue resumes it from durable
state) instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
from mpi4py import MPI

from ftmpi import events, spawning
from ftmpi.config import Config
from ftmpi.failpoints import at_start, failpoint, parse_failpoints
from ftmpi.guards import deadline, failures
from ftmpi.placement import replacement_nodes
from ftmpi.runtime import Runtime, durable_state
from ftmpi.spawning import (
    BackgroundSpawn,
    announce_ready,
    await_ready,
    bcast_json,
    gather_nodes,
    how_to_join,
    replacement_command,
    tell_replacements,
    warm_up,
)
from ftmpi.wire import PeerFailure, run_hash, wait_all

NODE_LOSS_GRACE = 5.0
"""Seconds the survivors wait before training on with fewer workers when every rank of some
node died (the node, or its Open MPI daemon, may be lost). Open MPI 5 ends the whole job when
it loses a node, but not at once: the launching node's ranks first, the others a few hundred
milliseconds later. Survivors that trained on in between would apply steps of fewer workers
than the run has and write node copies and snapshots of them, and the relaunch would resume
from those instead of from the state the run had when the node was lost."""


@dataclass
class Recovery:
    """What one recovery changed."""

    failed_workers: list[int] = field(default_factory=list)
    """Worker indices (in the old view) that died."""
    failed_servers: list[int] = field(default_factory=list)
    """Server slots that died."""
    respawned: list[int] = field(default_factory=list)
    """Server slots that received a new rank."""
    new_workers: int = 0
    """Replacement workers that joined (``respawn_workers``)."""
    rank_map: dict[int, int] = field(default_factory=dict)
    """Old world rank -> new world rank, for survivors."""


def _quiet(fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(MPI.Exception):
        fn(*args)


def role_of(rt: Runtime) -> str:
    return rt.role


def recover(
    rt: Runtime,
    *,
    blocking_strategy: bool,
    reason: str,
    spawn: bool = True,
    on_shrink: Callable[[dict[int, int]], None] | None = None,
) -> Recovery:
    """Run the recovery protocol on this survivor; see the module docstring.

    ``blocking_strategy``: workers cannot progress while a server is down, so down servers are
    replaced inside this call, after their down time. Otherwise only the coordinator's
    deferred request (``spawn_due``) replaces them. ``spawn=False`` (at exit): the coordinator
    asks for no replacement. ``on_shrink(rank_map)`` is called as soon as the world has
    shrunk (old rank -> new rank of the survivors), so state kept by rank is renumbered even
    if a later part of the recovery fails.
    """
    if not rt.ulfm:
        raise RuntimeError(
            f"a rank died ({reason}) and this MPI has no ULFM fault tolerance "
            "(run under Open MPI 5 with `mpirun --with-ft ulfm`, e.g. via ftmpi-run). "
            + durable_state(rt.config)
        )
    detected = time.monotonic()
    events.emit(
        rt.config.run_dir,
        "failure_detected",
        rank=rt.world_rank,
        role=role_of(rt),
        view=rt.view,
        reason=reason,
    )
    _quiet(rt.world.Revoke)
    _quiet(rt.group.Revoke)
    old = rt.world
    with failures("shrinking the world"):
        new = old.Shrink()
    new.Set_errhandler(MPI.ERRORS_RETURN)
    translated = MPI.Group.Translate_ranks(
        old.Get_group(), list(range(old.Get_size())), new.Get_group()
    )
    rank_map = {o: n for o, n in enumerate(translated) if n != MPI.UNDEFINED}
    failpoint("shrunk")
    emptied = _emptied_nodes(rt.nodes, rank_map)
    result = Recovery(rank_map=rank_map)
    result.failed_workers = [i for i, r in enumerate(rt.workers) if r not in rank_map]
    result.failed_servers = [
        j for j, r in enumerate(rt.servers) if r is not None and r not in rank_map
    ]
    rt.workers = [rank_map[r] for r in rt.workers if r in rank_map]
    rt.servers = [rank_map.get(r) if r is not None else None for r in rt.servers]
    rt.nodes = [rt.nodes[o] for o in sorted(rank_map, key=rank_map.__getitem__)]
    if on_shrink is not None:
        on_shrink(rank_map)
    for j in result.failed_servers:
        rt.down_since[j] = detected
    if rt.config.respawn_workers:
        rt.workers_down += [detected] * len(result.failed_workers)
    # recorded before the new view's communicators are built: a death while they are built
    # starts the recovery over, and the ranks that died before it still count
    me = new.Get_rank()
    events.emit(
        rt.config.run_dir,
        "view_change",
        rank=me,
        role=rt.role if rt.is_server else f"worker {rt.workers.index(me)}",
        view=rt.view + 1,
        failed_workers=result.failed_workers,
        failed_servers=result.failed_servers,
        workers=len(rt.workers),
    )
    _install(rt, new)
    if is_coordinator(rt) and (result.failed_workers or result.failed_servers):
        _say(
            rt,
            f"{_names(result.failed_servers, result.failed_workers)} died; "
            f"recovering with strategy {rt.config.strategy}, {rt.num_workers} worker(s) left",
        )
    if emptied and result.failed_workers:
        _await_job_end(rt, emptied)
    # Replace down servers now if workers would wait for them anyway (a collective spawn, after
    # their down time), or admit the replacements the coordinator spawned in the background.
    if (rt.down_since or rt.workers_down) and blocking_strategy and spawn and is_coordinator(rt):
        since = min([*rt.down_since.values(), *rt.workers_down])
        wait = max(0.0, since + rt.config.down_for - time.monotonic())
        time.sleep(wait)
    coordinating = spawn and is_coordinator(rt)
    bg = _pending(rt) if coordinating else None
    collective = _workers_due(rt) or (blocking_strategy and spawn_due(rt))
    want = np.array(
        [
            1 if coordinating and collective else 0,
            1 if bg is not None and bg.ready and bg.error is None else 0,
        ],
        dtype=np.int64,
    )
    limit = rt.config.timeout + (rt.config.down_for if blocking_strategy else 0)
    wait_all(
        [rt.world.Iallreduce(MPI.IN_PLACE, want, op=MPI.MAX)], limit, "agreeing on replacements"
    )
    workers_before = rt.num_workers
    if want[1]:
        result.respawned = admit_background(rt)
    elif want[0]:
        result.respawned = spawn_replacements(rt)
    result.new_workers = rt.num_workers - workers_before
    return result


def is_coordinator(rt: Runtime) -> bool:
    """Worker 0 of the current view coordinates recoveries."""
    return not rt.is_server and rt.role_rank == 0


def request_due_replacements(rt: Runtime) -> None:
    """Coordinator, at a step boundary, for strategies that go on while a rank is down.

    A dead worker whose down time has passed (``respawn_workers``): revoke the world so that
    every rank joins a recovery that spawns its replacement collectively (the survivors wait
    for it: the replacement takes the dead worker's place and data position, so the run
    stays the one without the failure). A down server slot whose down time has passed: start
    spawning its replacement in the background (:class:`~ftmpi.spawning.BackgroundSpawn`)
    while training goes on; once that spawn has returned, revoke the world so that every rank
    joins a recovery that admits it. Either way raises ``PeerFailure`` so the caller joins the
    recovery too. A no-op elsewhere, and while nothing is due or the spawn is under way.
    Raises the spawn's own error (e.g. :class:`~ftmpi.fatal.UserError` for a spare node Open
    MPI does not know) once it failed, except when its processes merely never came up
    (:func:`_spawn_failed`: spawned again)."""
    if not is_coordinator(rt) or not (rt.down_since or rt.workers_down):
        return
    if _workers_due(rt):
        _quiet(rt.world.Revoke)
        raise PeerFailure("replacement due", MPI.ERR_REVOKED)
    bg = _pending(rt)
    if bg is None:
        if _background_due(rt):
            rt.spawning = _spawn_in_background(rt)
        return
    if not bg.ready:
        return
    if bg.error is not None:
        rt.spawning = None
        raise bg.error
    _quiet(rt.world.Revoke)
    raise PeerFailure("replacement ready", MPI.ERR_REVOKED)


def replacements_due(rt: Runtime) -> bool:
    """Whether :func:`request_due_replacements` would raise now (on the coordinator: a dead
    worker's replacement is due, or a background spawn has returned); starts a background
    spawn that is due, as that does, and never raises."""
    if not is_coordinator(rt) or not (rt.down_since or rt.workers_down):
        return False
    if _workers_due(rt):
        return True
    bg = _pending(rt)
    if bg is None and _background_due(rt):
        rt.spawning = bg = _spawn_in_background(rt)
    return bg is not None and bg.ready


SPAWN_ATTEMPTS = 3
"""Background spawns whose processes never came up (:class:`~ftmpi.spawning.StartFailed`)
after which the coordinator stops trying: the down slots stay down for the rest of the run."""


def _pending(rt: Runtime) -> BackgroundSpawn | None:
    """The coordinator's spawn under way or not yet admitted (``Runtime.spawning``). A spawn
    whose processes never came up is dropped here (:func:`_spawn_failed`): None."""
    bg: BackgroundSpawn | None = rt.spawning
    if bg is not None and bg.ready and isinstance(bg.error, spawning.StartFailed):
        _spawn_failed(rt, bg)
        return None
    return bg


def _spawn_failed(rt: Runtime, bg: BackgroundSpawn) -> None:
    """Coordinator: a background spawn's processes never came up. Training goes on without
    them (nothing was agreed with the other ranks yet); the spawn is tried again ``down_for``
    s later, placed as before, up to :data:`SPAWN_ATTEMPTS` spawns in all (placed elsewhere,
    a new process failed at once: docs/recovery.md). The new processes cannot be stopped
    through MPI; their intercommunicator is freed at exit with the others, and Open MPI ends
    them with the job."""
    rt.spawning = None
    if bg.stuck is not None:
        rt.intercomms.append(bg.stuck)
    rt.spawn_failures += 1
    rt.spawn_retry_at = time.monotonic() + rt.config.down_for
    left = SPAWN_ATTEMPTS - rt.spawn_failures
    events.emit(
        rt.config.run_dir,
        "spawn_failed",
        role=role_of(rt),
        slots=bg.slots,
        nodes=bg.nodes,
        reason=str(bg.error),
        attempts_left=left,
    )
    where = f" on {', '.join(dict.fromkeys(bg.nodes))}" if bg.nodes else ""
    then = "spawning again" if left else "giving up: the slot(s) stay down for the rest of the run"
    _say(
        rt,
        f"the replacement for {_names(bg.slots, [])} did not come up{where} ({bg.error}); {then}",
    )


def _background_due(rt: Runtime) -> bool:
    """Whether the coordinator should start a background spawn now."""
    return (
        spawn_due(rt)
        and rt.spawn_failures < SPAWN_ATTEMPTS
        and time.monotonic() >= rt.spawn_retry_at
    )


def _due(rt: Runtime, since: list[float]) -> bool:
    """Whether ``down_for`` has passed since any of the times in ``since``."""
    now = time.monotonic()
    return any(now - t >= rt.config.down_for for t in since)


def spawn_due(rt: Runtime) -> bool:
    """Whether some down server's (or dead worker's) down time has passed."""
    return _due(rt, [*rt.down_since.values(), *rt.workers_down])


def _workers_due(rt: Runtime) -> bool:
    """Whether some dead worker's down time has passed (``respawn_workers``)."""
    return _due(rt, rt.workers_down)


def _install(rt: Runtime, world: MPI.Comm) -> None:
    """Make ``world`` the current view: bump the view, rebuild the role sub-communicator.

    Raises ``PeerFailure`` on every survivor alike when a rank died during it: the outcome of
    the Split is agreed (``MPI_Comm_agree``, uniform under ULFM), so no survivor goes on with
    a role communicator that a peer never got. The view is bumped before, so every survivor
    has counted this view whether or not its Split succeeded, and the views still agree after
    the recovery that follows."""
    rt.world = world
    rt.comms.append(world)  # freed at exit (see ftmpi.lifecycle.release)
    rt.view += 1
    ok = 1
    try:
        with failures("building the new view's role communicator (Split)"):
            group = world.Split(color=int(rt.is_server), key=world.Get_rank())
    except PeerFailure:
        ok = 0
    else:
        group.Set_errhandler(MPI.ERRORS_RETURN)
        rt.comms.append(group)
    with failures("agreeing on the new view"):
        ok = world.Agree(ok)
    if not ok:
        raise PeerFailure("building the new view's role communicator (Split)", MPI.ERR_PROC_FAILED)
    rt.group = group


class Assignment(TypedDict):
    """The role table the survivors send a replacement (a JSON document on the wire)."""

    config: dict[str, str]
    """The job's ``FTMPI_*`` settings (:meth:`ftmpi.Config.env`)."""
    run_id: str
    job_start: float
    view: int
    workers: list[int]
    servers: list[int | None]
    incarnations: list[int]
    chains: list[list[int]]


def _assignment(rt: Runtime) -> Assignment:
    return {
        "config": rt.config.env(),
        "run_id": rt.run_id,
        "job_start": rt.job_start,
        "view": rt.view,
        "workers": rt.workers,
        "servers": rt.servers,
        "incarnations": rt.incarnations,
        "chains": rt.chains,
    }


def _placement(rt: Runtime, slots: list[int], new_workers: int) -> tuple[list[str], bool]:
    """Where replacements for ``slots`` and ``new_workers`` go, and whether they are pinned
    there by name (only onto spare nodes the user listed: placing with the Info key ``host``
    crashed Open MPI 5.0's runtime in 8 of 21 re-spawns across nodes, docs/recovery.md, known
    limitations; without it Open MPI puts them on the launch node, which is live though it may
    hold another replica of the chain)."""
    hosts = replacement_nodes(
        rt.nodes,
        rt.config.spares,
        [rt.shard_of(j) for j in slots] + [None] * new_workers,
        [rt.chain_nodes(k) for k in range(rt.num_shards)],
    )
    return hosts, bool(rt.config.spares)


def _spawn_started(
    rt: Runtime, slots: list[int], new_workers: int, hosts: list[str] | None
) -> None:
    events.emit(
        rt.config.run_dir,
        "spawn_started",
        rank=rt.world_rank,
        role=role_of(rt),
        slots=slots,
        workers=new_workers,
        nodes=hosts,
        view=rt.view,
    )


def spawn_replacements(rt: Runtime) -> list[int]:
    """Spawn one process per down server slot (and per dead worker awaiting a replacement) and
    merge them into the world: a collective of all survivors, who all wait for the new
    processes to start (strategies whose workers wait anyway; see :func:`admit_background`
    for the others).

    The coordinator says which (a down slot its background spawn covers is left to it).
    Returns the refilled server slots. The replacements run ``sys.argv`` with this Python; new
    workers are appended to the worker list. With spare nodes listed, each is placed on the
    node :func:`ftmpi.placement.replacement_nodes` picks (``MPI_Comm_spawn_multiple``, one
    command per replacement with the Info key ``host``); otherwise one ``MPI_Comm_spawn`` lets
    Open MPI place them (measured: on the launch node). Every rank then learns every rank's
    node (:func:`~ftmpi.spawning.gather_nodes`).
    """
    bg = _pending(rt) if is_coordinator(rt) else None
    busy = set(bg.slots) if bg is not None else set()  # being spawned in the background
    plan: dict[str, Any] = {"slots": [j for j in sorted(rt.down_since) if j not in busy]}
    plan["workers"] = len(rt.workers_down)
    plan = bcast_json(rt.world, plan, rt.config.timeout, root=rt.workers[0])
    slots, new_workers = [int(j) for j in plan["slots"]], int(plan["workers"])
    if not slots and not new_workers:
        return []
    command = replacement_command()
    hosts, pinned = _placement(rt, slots, new_workers)
    _spawn_started(rt, slots, new_workers, hosts if pinned else None)
    world = rt.world
    assert isinstance(world, MPI.Intracomm)  # Dup, Shrink and Merge make intracommunicators
    with deadline(rt.config, role_of(rt), "spawning replacements (MPI_Comm_spawn + merge)"):
        inter = spawning.spawn(world, command, len(hosts), hosts if pinned else None)
        if world.Get_rank() == 0:
            await_ready(inter, rt.config.timeout)
            tell_replacements(inter, {"join": "merge"}, rt.config.timeout)
        with failures("merging the replacements into the world"):
            merged = inter.Merge(high=False)
    return _admit(rt, slots, new_workers, inter, merged, pinned)


def _spawn_in_background(rt: Runtime) -> BackgroundSpawn:
    """Coordinator: start spawning replacements for every down server slot on a thread (over
    ``MPI_COMM_SELF``); :func:`admit_background` admits them."""
    slots = sorted(rt.down_since)
    command = replacement_command()
    hosts, pinned = _placement(rt, slots, 0)
    _spawn_started(rt, slots, 0, hosts if pinned else None)
    return BackgroundSpawn(
        rt.config,
        role_of(rt),
        slots,
        0,
        lambda: spawning.spawn(MPI.COMM_SELF, command, len(hosts), hosts if pinned else None),
        hosts if pinned else None,
    )


def admit_background(rt: Runtime) -> list[int]:
    """Admit the replacements the coordinator spawned in the background (all survivors, in a
    recovery): the coordinator says which slots they fill, opens a port and sends it to them;
    the world accepts their connection (root: the coordinator) and merges with them. Returns
    the refilled server slots. Raises ``PeerFailure`` when a rank dies meanwhile (the spawn
    is kept for the next recovery unless the coordinator died)."""
    root = rt.workers[0]
    bg = _pending(rt) if is_coordinator(rt) else None
    doc = bcast_json(
        rt.world,
        {"slots": bg.slots, "workers": bg.new_workers} if bg is not None else None,
        rt.config.timeout,
        root=root,
    )
    world = rt.world
    assert isinstance(world, MPI.Intracomm)
    with deadline(rt.config, role_of(rt), "admitting replacements (MPI_Comm_accept + merge)"):
        port = bg.port() if bg is not None else ""
        with failures("admitting replacements (MPI_Comm_accept)"):
            inter = world.Accept(port, root=root)
        inter.Set_errhandler(MPI.ERRORS_RETURN)
        with failures("merging the replacements into the world"):
            merged = inter.Merge(high=False)
    if bg is not None:
        bg.close()
        assert bg.inter is not None
        rt.intercomms.append(bg.inter)
        rt.spawning = None
    slots = [int(j) for j in doc["slots"]]
    return _admit(rt, slots, int(doc["workers"]), inter, merged, bool(rt.config.spares))


def _admit(
    rt: Runtime,
    slots: list[int],
    new_workers: int,
    inter: MPI.Intercomm,
    merged: MPI.Intracomm,
    pinned: bool,
) -> list[int]:
    """The new processes are merged in (after the survivors, in ``merged``): give them their
    slots, send them the role table, learn every rank's node and install the new view."""
    merged.Set_errhandler(MPI.ERRORS_RETURN)
    now = time.monotonic()
    detected = min([rt.down_since.get(j, now) for j in slots] or [now])
    base = rt.world.Get_size()
    for k, j in enumerate(slots):
        rt.servers[j] = base + k
        rt.incarnations[j] += 1
        rt.down_since.pop(j, None)  # a rank that joined while j was down may not have it
        chain = rt.chains[rt.shard_of(j)]
        chain.remove(j)
        chain.append(j)  # a replacement joins its chain at the tail
    rt.workers += [base + len(slots) + k for k in range(new_workers)]
    waited = time.monotonic() - min([detected, *rt.workers_down[:new_workers]])
    rt.workers_down = rt.workers_down[new_workers:]
    rt.intercomms.append(inter)
    bcast_json(merged, _assignment(rt), rt.config.timeout)
    nodes = gather_nodes(merged, rt.config.timeout)
    rt.nodes = nodes
    _install(rt, merged)
    placed = nodes[base:]
    events.emit(
        rt.config.run_dir,
        "replacement_ready",
        rank=rt.world_rank,
        role=role_of(rt),
        slots=slots,
        workers=new_workers,
        nodes=placed,
        view=rt.view,
    )
    if is_coordinator(rt):
        where = f" (on {', '.join(placed)})" if pinned else ""
        _say(
            rt,
            f"recovered: {_names(slots, [], replaced=new_workers)} replaced{where}, "
            f"{waited:.1f} s after the failure (view {rt.view})",
        )
    return slots


def _emptied_nodes(nodes: list[str], rank_map: dict[int, int]) -> list[str]:
    """The nodes of a multi-node job none of whose ranks survived (``rank_map``: old world
    rank -> new, survivors only); none in a single-node job."""
    if len(set(nodes)) < 2:
        return []
    return sorted(set(nodes) - {nodes[r] for r in rank_map})


def _await_job_end(rt: Runtime, emptied: list[str]) -> None:
    """Workers died with every rank of ``emptied``: wait :data:`NODE_LOSS_GRACE` seconds before
    training on with fewer workers, in case Open MPI is ending the job for a lost node (then
    this process is killed meanwhile and nothing of the smaller job is written)."""
    events.emit(rt.config.run_dir, "nodes_emptied", role=role_of(rt), nodes=emptied)
    if is_coordinator(rt):
        _say(
            rt,
            f"every rank on {', '.join(emptied)} died; training goes on with fewer workers in "
            f"{NODE_LOSS_GRACE:g} s unless Open MPI ends the job for a lost node",
        )
    time.sleep(NODE_LOSS_GRACE)


def _names(servers: list[int], workers: list[int], *, replaced: int = 0) -> str:
    parts = [f"server {j}" for j in servers] + [f"worker {i}" for i in workers]
    if replaced:
        parts.append(f"{replaced} worker(s)")
    return ", ".join(parts) or "nothing"


def _say(rt: Runtime, text: str) -> None:
    """One line on the terminal for a failure or a recovery (the coordinator says it)."""
    print(f"ftmpi: {text}", file=sys.stderr, flush=True)


def join_as_replacement(parent: MPI.Intercomm) -> Runtime:
    """The replacement side of :func:`spawn_replacements` and :func:`admit_background`: learn
    how to join (:func:`~ftmpi.spawning.how_to_join`), merge, learn the role, join. Exits with
    status 0 when told to quit (the job finished before this process was admitted)."""
    parent.Set_errhandler(MPI.ERRORS_RETURN)
    launch_config = Config.from_env(os.environ)  # the job's settings, until the parents' arrive
    with (
        deadline(launch_config, "a replacement", "joining the job (merge)"),
        failures("joining the job (merge)"),
    ):
        warm_up()
        at_start(parse_failpoints(launch_config.failpoints), launch_config.run_dir)
        announce_ready(parent, launch_config.timeout)
        how = how_to_join(parent, launch_config.timeout)
        if how["join"] == "quit":
            parent.Disconnect()
            sys.exit(0)
        if how["join"] == "connect":
            inter = MPI.COMM_WORLD.Connect(how["port"], root=0)
            inter.Set_errhandler(MPI.ERRORS_RETURN)
            merged = inter.Merge(high=True)
        else:
            inter = parent
            merged = parent.Merge(high=True)
    merged.Set_errhandler(MPI.ERRORS_RETURN)
    doc: Assignment = bcast_json(merged, None, launch_config.timeout)
    nodes = gather_nodes(merged, launch_config.timeout)
    config_env = dict(doc["config"])
    os.environ.update(config_env)
    config = Config.from_env(config_env)
    servers = list(doc["servers"])
    me = merged.Get_rank()
    is_server = me in servers
    rt = Runtime(
        config=config,
        world=merged,
        group=merged,
        is_server=is_server,
        workers=list(doc["workers"]),
        servers=servers,
        run_id=str(doc["run_id"]),
        run=run_hash(str(doc["run_id"])),
        job_start=float(doc["job_start"]),
        server_index=servers.index(me) if is_server else -1,
        # slots still down when this process joins: their replacements are admitted later
        down_since={j: time.monotonic() for j, r in enumerate(servers) if r is None},
        incarnations=list(doc["incarnations"]),
        chains=[list(c) for c in doc["chains"]],
        nodes=nodes,
        view=int(doc["view"]),
        ulfm=True,
        intercomms=[parent, inter] if inter is not parent else [parent],
        late_joiner=not is_server,
    )
    _install(rt, merged)
    events.emit(
        config.run_dir,
        "replacement_joined",
        rank=me,
        role=role_of(rt),
        node=nodes[me],
        view=rt.view,
    )
    return rt
