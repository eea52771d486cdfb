"""The record of this process's place in the job: who is who (world, role group, workers,
servers, chains, view), read by every part of ftmpi.

:class:`Runtime` holds no behaviour beyond lookups; creating, changing and ending it is the
lifecycle's (:mod:`ftmpi.lifecycle`: ``init``, ``shutdown``, the exit barrier) and the
membership's (:mod:`ftmpi.membership`: a recovery installs a new view). This module imports no
MPI at run time, so ``import ftmpi`` does not initialise MPI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ftmpi.config import Config

if TYPE_CHECKING:
    from mpi4py import MPI

    from ftmpi.collective import CollectiveBackend


@dataclass
class Runtime:
    """This process's place in the job. Created once by :func:`init`."""

    config: Config
    world: MPI.Comm
    """Duplicate of COMM_WORLD: all worker <-> server traffic."""
    group: MPI.Comm
    """The workers' (on a worker) or the servers' (on a server) sub-communicator."""
    is_server: bool
    workers: list[int]
    """World rank of each worker, in worker order (a dead worker is removed)."""
    servers: list[int | None]
    """World rank of each server slot; ``None`` while that server is down."""
    run_id: str
    run: int
    """Digest of ``run_id`` carried in message headers."""
    job_start: float
    """Wall-clock time (``time.time()``) the job started, agreed by all ranks."""
    server_index: int = -1
    """This process's server slot (servers only)."""
    incarnations: list[int] = field(default_factory=list)
    """How many times each server slot has been replaced."""
    down_since: dict[int, float] = field(default_factory=dict)
    """Server slots that are down, and since when (``time.monotonic()`` on this rank)."""
    workers_down: list[float] = field(default_factory=list)
    """With ``respawn_workers``: when each dead worker that awaits a replacement died."""
    spawning: Any = field(default=None, repr=False)
    """The coordinator's replacements being spawned in the background, not yet admitted (an
    :class:`ftmpi.spawning.BackgroundSpawn`, or None)."""
    spawn_failures: int = 0
    """Background spawns whose processes never came up (the coordinator tries again)."""
    spawn_retry_at: float = 0.0
    """``time.monotonic()`` before which the coordinator starts no background spawn."""
    checkpoint_requested: bool = False
    """SIGUSR1 arrived (a batch system's warning before preemption or the time limit)."""
    late_joiner: bool = False
    """This worker was spawned to replace a dead one (it joins training in progress)."""
    backend: CollectiveBackend | None = None
    view: int = 0
    """Membership view number; increases with every membership change."""
    ulfm: bool = False
    """Whether the MPI survives rank deaths (Open MPI with ``--with-ft ulfm``)."""
    chains: list[list[int]] = field(default_factory=list)
    """Per shard, its server slots in chain order (head first). One slot per shard unless the
    strategy replicates shards on chains (spread over the nodes: :mod:`ftmpi.placement`); a
    replacement is appended at the tail."""
    nodes: list[str] = field(default_factory=list)
    """The node (``MPI_Get_processor_name``) of every rank of ``world``, by world rank: gathered
    at start and after every Merge, renumbered with every Shrink, so it always matches the
    current view."""
    intercomms: list[Any] = field(default_factory=list, repr=False)
    comms: list[Any] = field(default_factory=list, repr=False)
    """Every communicator ftmpi created on this process (all views), freed at exit."""
    stopped: bool = field(default=False, repr=False)
    """The worker has run :func:`ftmpi.shutdown` (it sends nothing more)."""

    @property
    def world_rank(self) -> int:
        return self.world.Get_rank()

    @property
    def role_rank(self) -> int:
        return self.group.Get_rank()

    @property
    def role(self) -> str:
        """``"worker 1"`` or ``"server 0"``: how messages and events name this process."""
        return f"server {self.server_index}" if self.is_server else f"worker {self.role_rank}"

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def num_servers(self) -> int:
        return len(self.servers)

    @property
    def num_shards(self) -> int:
        return len(self.chains)

    def shard_of(self, slot: int) -> int:
        """The shard whose chain holds server slot ``slot``."""
        return next(k for k, chain in enumerate(self.chains) if slot in chain)

    def live_chain(self, shard: int) -> list[int]:
        """``shard``'s live server slots, head first."""
        return [s for s in self.chains[shard] if self.servers[s] is not None]

    def chain_nodes(self, shard: int) -> list[str]:
        """The nodes of ``shard``'s live servers, head first."""
        return [self.nodes[self.server_world_rank(s)] for s in self.live_chain(shard)]

    def shard_head(self, shard: int) -> int:
        """World rank of the server that takes ``shard``'s requests (its chain's live head);
        raises ``ServerDown`` while the shard has no live server."""
        live = self.live_chain(shard)
        if not live:
            raise _server_down(shard)
        return self.server_world_rank(live[0])

    def server_world_rank(self, server: int) -> int:
        """World rank of server slot ``server``; raises ``ServerDown`` while it is down."""
        rank = self.servers[server]
        if rank is None:
            raise _server_down(server)
        return rank

    def worker_index(self, world_rank: int) -> int:
        """Worker index of a world rank (``ValueError`` if it is not a live worker)."""
        return self.workers.index(world_rank)


_RUNTIME: Runtime | None = None


def current() -> Runtime | None:
    """The runtime :func:`ftmpi.init` created, or ``None`` before it (never raises; safe from
    any thread)."""
    return _RUNTIME


def install(rt: Runtime) -> None:
    """Make ``rt`` this process's runtime (done once, by :func:`ftmpi.init`)."""
    global _RUNTIME
    _RUNTIME = rt


def runtime() -> Runtime:
    """The runtime created by :func:`ftmpi.init`; raises ``RuntimeError`` if init was not
    called."""
    if _RUNTIME is None:
        raise RuntimeError("ftmpi is not initialised; call ftmpi.init() first")
    return _RUNTIME


def _server_down(slot: int) -> Exception:
    # ftmpi.wire imports mpi4py.MPI, which initialises MPI: imported when first needed
    from ftmpi.wire import ServerDown

    return ServerDown(slot)


def durable_state(config: Config) -> str:
    """What a restarted job resumes from, in one sentence for error messages."""
    if config.strategy == "checkpoint" and config.snapshot_dir:
        return (
            f"A restart with FTMPI_RESUME=1 (ftmpi-run --max-restarts) resumes from the newest "
            f"valid snapshot in {config.snapshot_dir}."
        )
    return (
        f"strategy='{config.strategy}' keeps no durable state: a restart begins from the "
        "script's own checkpoint, or from step 0 (use strategy checkpoint for durable snapshots)."
    )


def rank() -> int:
    """This worker's rank among the workers (what ``hvd.rank()`` answers)."""
    return runtime().role_rank


def size() -> int:
    """Number of worker ranks (servers are not counted, as in ``hvd.size()``)."""
    return runtime().num_workers


def local_rank() -> int:
    """This worker's rank among the workers on its node (``MPI_Get_processor_name``), in
    worker order: known from the view alone, so no recovery has to agree on it."""
    rt = runtime()
    return _node_workers(rt).index(rt.world_rank)


def local_size() -> int:
    """Number of workers on this node."""
    return len(_node_workers(runtime()))


def _node_workers(rt: Runtime) -> list[int]:
    node = rt.nodes[rt.world_rank]
    return [r for r in rt.workers if rt.nodes[r] == node]
