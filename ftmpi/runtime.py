"""Roles: ``ftmpi.init()`` splits COMM_WORLD into worker and server ranks.

Ranks ``0..W-1`` are workers, ``W..W+S-1`` servers. The same script runs on every rank: on a
server rank :func:`init` runs the server loop and then exits the process (``SystemExit``), so code
after ``init()`` only ever runs on workers. Every communicator ftmpi uses has
``MPI.ERRORS_RETURN`` set, so a peer's death surfaces as an exception instead of an abort.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ftmpi.config import Config

if TYPE_CHECKING:
    from mpi4py import MPI

    from ftmpi.backends import CollectiveBackend


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
    backend: CollectiveBackend | None = None
    local: MPI.Comm | None = None
    """The workers on this node (workers only)."""
    view: int = 0
    """Membership view number; increases with every membership change."""
    ulfm: bool = False
    """Whether the MPI survives rank deaths (Open MPI with ``--with-ft ulfm``)."""
    intercomms: list[Any] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def world_rank(self) -> int:
        return self.world.Get_rank()

    @property
    def role_rank(self) -> int:
        return self.group.Get_rank()

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def num_servers(self) -> int:
        return len(self.servers)

    def server_world_rank(self, server: int) -> int:
        """World rank of server slot ``server``; raises ``ServerDown`` while it is down."""
        rank = self.servers[server]
        if rank is None:
            from ftmpi.wire import ServerDown

            raise ServerDown(server)
        return rank

    def worker_index(self, world_rank: int) -> int:
        """Worker index of a world rank (``ValueError`` if it is not a live worker)."""
        return self.workers.index(world_rank)


_RUNTIME: Runtime | None = None


def init(servers: int | None = None, mode: str | None = None, **options: Any) -> Runtime:
    """Initialise ftmpi: validate the configuration, split the world, start the server loop.

    Keyword arguments override ``FTMPI_*`` environment variables (see :class:`ftmpi.Config`).
    Raises :class:`ftmpi.ConfigError` before any MPI communication if the configuration does not
    fit the world (e.g. ``servers >= world size``). On a server rank this call does not return:
    the process exits with status 0 when every worker has finished, non-zero on a failure.
    Calling it again on a worker returns the existing runtime.
    """
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    config = Config.from_env(servers=servers, mode=mode, **options)

    from mpi4py import MPI

    if MPI.Comm.Get_parent() != MPI.COMM_NULL:  # a replacement spawned after a failure
        from ftmpi.membership import join_as_replacement

        _RUNTIME = rt = join_as_replacement(MPI.Comm.Get_parent())
        _run_server_and_exit(rt)
    num_workers = config.check_world(MPI.COMM_WORLD.Get_size())
    MPI.COMM_WORLD.Set_errhandler(MPI.ERRORS_RETURN)
    world = MPI.COMM_WORLD.Dup()
    world.Set_errhandler(MPI.ERRORS_RETURN)
    is_server = world.Get_rank() >= num_workers
    group = world.Split(color=int(is_server), key=world.Get_rank())
    group.Set_errhandler(MPI.ERRORS_RETURN)
    run_id, job_start = _agree_run_id(world, config)
    from ftmpi.wire import run_hash

    rt = Runtime(
        config=config,
        world=world,
        group=group,
        is_server=is_server,
        workers=list(range(num_workers)),
        servers=list(range(num_workers, num_workers + config.servers)),
        run_id=run_id,
        run=run_hash(run_id),
        job_start=job_start,
        server_index=world.Get_rank() - num_workers if is_server else -1,
        incarnations=[0] * config.servers,
        ulfm=ulfm_enabled(),
    )
    _RUNTIME = rt
    if is_server:
        _run_server_and_exit(rt)
    from ftmpi.backends import select_backend

    rt.local = group.Split_type(MPI.COMM_TYPE_SHARED, key=group.Get_rank())
    rt.local.Set_errhandler(MPI.ERRORS_RETURN)
    rt.backend = select_backend(rt)
    atexit.register(shutdown)
    return rt


def ulfm_enabled() -> bool:
    """Whether this job runs Open MPI with ULFM fault tolerance switched on."""
    flag = os.environ.get("OMPI_MCA_mpi_ft_enable", "")  # noqa: SIM112 - Open MPI spelling
    return flag.lower() in ("1", "true", "yes")


def _agree_run_id(world: MPI.Comm, config: Config) -> tuple[str, float]:
    """Worker 0's run id (from the config, or generated) and start time, known to every rank."""
    from ftmpi.wire import wait_all

    buf = np.zeros(136, dtype=np.uint8)
    if world.Get_rank() == 0:
        rid = config.run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        raw = rid.encode()[:127]
        buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        start = float(os.environ.get("FTMPI_JOB_START", time.time()))
        buf[128:] = np.frombuffer(np.float64(start).tobytes(), dtype=np.uint8)
    wait_all([world.Ibcast(buf, root=0)], config.timeout, "agreeing on the run id")
    return buf[:128].tobytes().rstrip(b"\0").decode(), float(buf[128:].view(np.float64)[0])


def _run_server_and_exit(rt: Runtime) -> None:
    from ftmpi.server import ParameterServer

    code = 0
    try:
        ParameterServer(rt).serve()
    except Exception as exc:  # the server's failure ends this rank, loudly
        print(f"ftmpi server {rt.server_index} (rank {rt.world_rank}): {exc}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def runtime() -> Runtime:
    """The runtime created by :func:`init`; raises ``RuntimeError`` if init was not called."""
    if _RUNTIME is None:
        raise RuntimeError("ftmpi is not initialised; call ftmpi.init() first")
    return _RUNTIME


def shutdown() -> None:
    """Tell every server this worker is done. Idempotent; also runs at interpreter exit."""
    rt = _RUNTIME
    if rt is None or rt.is_server or rt._stopped:
        return
    rt._stopped = True
    from ftmpi.wire import TAG_DATA, TAG_HEADER, Header, Kind, PeerFailure, send

    for s in range(rt.num_servers):
        header = Header(Kind.STOP, rt.run, 0, s, 0, rt.view, 0)
        with contextlib.suppress(PeerFailure):  # a dead server needs no stop message
            send(
                rt.world,
                rt.server_world_rank(s),
                header,
                None,
                tag=TAG_HEADER,
                data_tag=TAG_DATA,
                chunk_bytes=rt.config.chunk_bytes,
                timeout=rt.config.timeout,
                what=f"stopping server {s}",
            )


def rank() -> int:
    """This worker's rank among the workers (what ``hvd.rank()`` answers)."""
    return runtime().role_rank


def size() -> int:
    """Number of worker ranks (servers are not counted, as in ``hvd.size()``)."""
    return runtime().num_workers


def local_rank() -> int:
    """This worker's rank among the workers on its node."""
    return _local_comm().Get_rank()


def local_size() -> int:
    """Number of workers on this node."""
    return _local_comm().Get_size()


def _local_comm() -> MPI.Comm:
    comm = runtime().local
    assert comm is not None
    return comm
