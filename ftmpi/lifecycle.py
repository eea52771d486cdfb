"""The lifecycle of a process in an ftmpi job: :func:`init` splits COMM_WORLD into worker and
server ranks, :func:`shutdown` ends a worker's part, :func:`release` prepares any rank for
``MPI_Finalize`` after failures.

Ranks ``0..W-1`` are workers, ``W..W+S-1`` servers. The same script runs on every rank: on a
server rank :func:`init` runs the server loop and then exits the process (``SystemExit``), so code
after ``init()`` only ever runs on workers. Every communicator ftmpi uses has
``MPI.ERRORS_RETURN`` set, so a peer's death surfaces as an exception instead of an abort.

``import ftmpi`` must not initialise MPI (``mpi4py.MPI`` does, when imported), so the modules that
import it (membership, server, backends, wire, manifest, record) are imported inside the calls
that need them, never at module level.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import secrets
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ftmpi import fatal, ompi
from ftmpi.config import Config
from ftmpi.placement import initial_chains
from ftmpi.repro import apply_deterministic, warn_caveats
from ftmpi.resources import start_from_env as start_resource_sampler
from ftmpi.runtime import Runtime, current, durable_state, install

if TYPE_CHECKING:
    from mpi4py import MPI


def init(servers: int | None = None, mode: str | None = None, **options: Any) -> Runtime:
    """Initialise ftmpi: validate the configuration, split the world, start the server loop.

    Keyword arguments override ``FTMPI_*`` environment variables (see :class:`ftmpi.Config`).
    Raises :class:`ftmpi.ConfigError` before any MPI communication if the configuration does not
    fit the world (e.g. ``servers >= world size``). On a server rank this call does not return:
    the process exits with status 0 when every worker has finished, non-zero on a failure.
    Calling it again on a worker returns the existing runtime.
    """
    existing = current()
    if existing is not None:
        return existing
    fatal.install()  # an uncaught exception on any rank ends the whole job (ftmpi.fatal)
    if _parent_name() in MPI_DAEMONS:
        die_with_parent(signal.SIGKILL)  # a rank whose launcher died is of no use
    config = Config.from_env(servers=servers, mode=mode, **options)
    apply_deterministic(config)
    start_resource_sampler(config.run_dir)  # FTMPI_SAMPLE_RESOURCES=<seconds>

    from mpi4py import MPI

    if MPI.Comm.Get_parent() != MPI.COMM_NULL:  # a replacement spawned after a failure
        from ftmpi.membership import join_as_replacement

        rt = join_as_replacement(MPI.Comm.Get_parent())
        install(rt)
        fatal.install(rt)
        if rt.is_server:
            _run_server_and_exit(rt)
        _start_worker(rt)
        return rt
    num_workers = config.check_world(MPI.COMM_WORLD.Get_size())
    MPI.COMM_WORLD.Set_errhandler(MPI.ERRORS_RETURN)
    world = MPI.COMM_WORLD.Dup()
    world.Set_errhandler(MPI.ERRORS_RETURN)
    is_server = world.Get_rank() >= num_workers
    group = world.Split(color=int(is_server), key=world.Get_rank())
    group.Set_errhandler(MPI.ERRORS_RETURN)
    run_id, job_start = _agree_run_id(world, config)
    from ftmpi.spawning import gather_nodes
    from ftmpi.wire import run_hash

    nodes = gather_nodes(world, config.timeout)
    replicas = config.chain_length if config.chained else 1

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
        chains=initial_chains(nodes[num_workers:], replicas),
        nodes=nodes,
        ulfm=ulfm_enabled(),
    )
    rt.comms += [world, group]
    install(rt)
    fatal.install(rt)
    _catch_checkpoint_signal(rt)
    if not rt.ulfm and world.Get_rank() == 0 and config.strategy != "none":
        print(
            "ftmpi: this MPI runs without ULFM fault tolerance (Open MPI 5 with `mpirun --with-ft "
            f"ulfm` provides it): a rank death ends the job. {durable_state(config)}",
            file=sys.stderr,
            flush=True,
        )
    if is_server:
        _run_server_and_exit(rt)
    _start_worker(rt)
    return rt


def _start_worker(rt: Runtime) -> None:
    """Worker set-up after the roles are known: backend, exit hook.
    A late joiner takes the survivors' backend (``select_backend`` agrees on it with them)."""

    from ftmpi import failpoints
    from ftmpi.backends import select_backend

    rt.backend = select_backend(rt)
    failpoints.arm(
        failpoints.parse_failpoints(rt.config.failpoints),
        "worker",
        rt.role_rank,
        int(rt.late_joiner),
        run_dir=rt.config.run_dir,
    )
    if rt.role_rank == 0:
        warn_caveats(rt.config, backend=rt.backend.name, workers=rt.num_workers)
    from ftmpi.manifest import write_manifest

    write_manifest(rt)  # worker 0 writes manifest.json
    atexit.register(shutdown)


def _catch_checkpoint_signal(rt: Runtime) -> None:
    """Turn SIGUSR1 (whose default action kills the process) into a checkpoint request that
    the next ``step()`` carries out, unless the program installed its own handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL:
        return

    def request(signum: int, frame: Any) -> None:
        rt.checkpoint_requested = True

    signal.signal(signal.SIGUSR1, request)


def ulfm_enabled() -> bool:
    """Whether this process's MPI survives rank deaths: Open MPI's ``mpi_ft_enable`` control
    variable as MPI itself reports it (:func:`ftmpi.ompi.ft_enabled`), whatever set it
    (``mpirun --with-ft ulfm``, an MCA parameter file, ``OMPI_MCA_mpi_ft_enable`` in any
    spelling Open MPI accepts). An MPI without that variable (not Open MPI 5) has no ULFM."""
    return ompi.ft_enabled()


MPI_DAEMONS = frozenset({"prterun", "prted", "mpirun", "mpiexec", "prte", "slurmstepd"})
"""Parents of a rank: the MPI launcher or its node daemon, or Slurm's step daemon."""


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies
    (``PR_SET_PDEATHSIG``; Linux only, a no-op elsewhere). Exits at once (status 1) if the
    parent is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)


def _parent_name() -> str:
    try:
        with open(f"/proc/{os.getppid()}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


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

    try:
        ParameterServer(rt).serve()
    except Exception as exc:  # a server's error is the job's: shown once, every rank ended
        fatal.end_job(exc, exc.__traceback__)
    release(rt)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(0)


def shutdown() -> None:
    """Record the run's end (:func:`ftmpi.record.finish`: every worker reports to worker 0,
    which writes ``summary.json``) and tell every server this worker is done. Idempotent; also
    runs at interpreter exit. Worker 0 waits up to ``config.timeout`` for the others' reports."""
    rt = current()
    if rt is None or rt.is_server or rt.stopped:
        return
    rt.stopped = True
    from ftmpi.record import finish

    finish(rt)  # summary.json and the manifest's outcome (worker 0), never raises
    _stop_servers(rt)
    release(rt)


def _stop_servers(rt: Runtime) -> None:
    """Tell every live server that this worker is done (STOP; a server ends once every worker
    of its view has said so)."""
    from ftmpi.wire import TAG_DATA, TAG_HEADER, Header, Kind, PeerFailure, send

    for s in range(rt.num_servers):
        if rt.servers[s] is None:
            continue  # down: nothing to stop
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


def release(rt: Runtime) -> None:
    """Prepare this process for ``MPI_Finalize`` after failures (all roles, at exit).

    First a barrier of the current view, so no rank finalizes while a peer still talks to it.
    A rank that died near the end (after the last step, e.g. in the final pull) fails that
    barrier on every survivor; they then run the recovery together (without spawning
    replacements: training is over) and try the barrier again in the new view, since a server
    may already be in that recovery and would otherwise wait for this process. A worker that
    finished while others still train (async mode) joins their recoveries from here too (one
    that admits a replacement included: the workers' part of a recovery is theirs alone with
    the MPI backend) and sends its end-of-training report and its STOPs again on the new
    view, whose messages alone count (a replacement server has not seen them). Then every
    communicator ftmpi created is freed (a local operation in Open MPI). Open MPI's
    finalize runs a disconnect handshake with every peer of every communicator that still spans
    more than one job (the original job and re-spawned servers); a communicator of an older view
    may hold a dead rank, and the handshake would wait for it forever (fault tolerance is off by
    then). With them freed no such handshake is left. Open MPI's finalize also runs a runtime
    fence over this process's original job, which can hang when a rank of that job died; after
    the barrier every live rank has finished its MPI traffic, so that fence is skipped.
    """
    if not rt.ulfm or rt.view == 0:
        return
    from mpi4py import MPI

    from ftmpi.membership import recover
    from ftmpi.record import report_again
    from ftmpi.wire import CommTimeout, PeerFailure, ServerDown, wait_all

    role = rt.role  # asks the role communicator, which is freed below
    if rt.spawning is not None:  # replacements spawned in the background, never admitted
        rt.spawning.dismiss()
        rt.spawning = None
    for _attempt in range(_EXIT_RECOVERIES + 1):
        try:
            wait_all([rt.world.Ibarrier()], rt.config.timeout, "the exit barrier")
            break
        except PeerFailure as exc:
            with contextlib.suppress(PeerFailure, CommTimeout, MPI.Exception):
                recover(rt, blocking_strategy=False, reason=f"at exit: {exc}", spawn=False)
                if rt.stopped:  # a new view: its replacements and members take them anew
                    report_again(rt)
                    _stop_servers(rt)
        except (CommTimeout, MPI.Exception, ServerDown):
            break
    seen = set()
    for comm in reversed([*rt.comms, *rt.intercomms]):
        if id(comm) in seen or comm == MPI.COMM_NULL:
            continue
        seen.add(id(comm))
        with contextlib.suppress(MPI.Exception):
            comm.Free()
    rt.comms.clear()
    rt.intercomms.clear()
    if os.environ.get("FTMPI_SKIP_FENCE", "1") == "1":
        ompi.skip_finalize_fence(role)


_EXIT_RECOVERIES = 3
"""Rank deaths at exit that :func:`release` recovers from before it gives up on the barrier."""
