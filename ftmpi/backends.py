"""Collective backends: how workers average gradients and share tensors among themselves.

Workers only: servers never take part. A backend works on contiguous CPU tensors in place. Every
call either completes, raises :class:`~ftmpi.wire.CommTimeout` after the configured timeout, or
raises :class:`~ftmpi.wire.PeerFailure` when a worker died (under ULFM).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from mpi4py import MPI

from ftmpi import events
from ftmpi.collective import CollectiveBackend, PendingReduce
from ftmpi.guards import deadline
from ftmpi.wire import CommTimeout, PeerFailure, abandon_requests, mpi_errors, wait_all

if TYPE_CHECKING:
    from ftmpi.runtime import Runtime

_MPI_TYPES = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}


class MPIBackend:
    """Buffer-based non-blocking MPI collectives on the workers' communicator.

    Averages are computed as a sum followed by a division by the worker count (not a
    multiplication by its reciprocal), so two workers give exactly ``(a + b) / 2``.
    """

    name = "mpi"

    def __init__(self, comm: MPI.Comm, timeout: float) -> None:
        self.comm = comm
        self.timeout = timeout

    def size(self) -> int:
        return self.comm.Get_size()

    def rank(self) -> int:
        return self.comm.Get_rank()

    def _buf(self, t: torch.Tensor) -> list[object]:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("MPI backend needs contiguous CPU tensors")
        try:
            return [t.numpy(), _MPI_TYPES[t.dtype]]
        except KeyError:
            raise TypeError(
                f"MPI backend cannot reduce {t.dtype}; use float32 or float64 parameters"
            ) from None

    def _bytes(self, t: torch.Tensor) -> list[object]:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("MPI backend needs contiguous CPU tensors")
        return [t.reshape(-1).view(torch.uint8).numpy(), MPI.BYTE]

    def allreduce_(self, t: torch.Tensor, *, average: bool, predivide: float = 1.0) -> None:
        self.start_allreduce_(t, average=average, predivide=predivide, name="").wait()

    def start_allreduce_(
        self, t: torch.Tensor, *, average: bool, predivide: float = 1.0, name: str
    ) -> PendingReduce:
        return _MPIReduce(self, t, average, predivide)

    def broadcast_(self, t: torch.Tensor, root: int) -> None:
        if self.size() == 1:
            return
        with mpi_errors("worker broadcast"):
            req = self.comm.Ibcast(self._bytes(t), root=root)
        wait_all([req], self.timeout, "worker broadcast")

    def barrier(self) -> None:
        with mpi_errors("worker barrier"):
            req = self.comm.Ibarrier()
        wait_all([req], self.timeout, "worker barrier")


class _MPIReduce:
    """An ``MPI_Iallreduce`` (sum) on a tensor, divided on completion for an average. A
    failure to start it is kept and raised by :meth:`wait`, so a caller inside backward (a
    gradient hook) never sees it."""

    def __init__(self, backend: MPIBackend, t: torch.Tensor, average: bool, predivide: float):
        self.t, self.average, self.predivide = t, average, predivide
        self.workers = backend.size()
        self.timeout = backend.timeout
        self.req: MPI.Request | None = None
        self.error: PeerFailure | None = None
        if average and predivide != 1.0:
            t.div_(predivide)
        if self.workers > 1:
            try:
                with mpi_errors("worker allreduce"):
                    self.req = backend.comm.Iallreduce(MPI.IN_PLACE, backend._buf(t), op=MPI.SUM)
            except PeerFailure as exc:
                self.error = exc

    def done(self) -> bool:
        if self.req is None:
            return True
        try:
            return bool(self.req.Test())
        except MPI.Exception:
            return True  # completed with an error: wait() raises it

    def wait(self) -> None:
        if self.error is not None:
            raise self.error
        if self.req is not None:
            wait_all([self.req], self.timeout, "worker allreduce")
        if self.average:
            if self.predivide != 1.0:
                self.t.mul_(self.predivide)
            self.t.div_(self.workers)

    def abandon(self) -> None:
        if self.req is not None:
            abandon_requests([self.req])
            self.req = None


class _HorovodReduce:
    """A Horovod ``allreduce_async_`` handle (see :meth:`HorovodBackend._wait`)."""

    def __init__(self, backend: HorovodBackend, handle: int | None, error: PeerFailure | None):
        self.backend, self.handle, self.error = backend, handle, error

    def done(self) -> bool:
        try:
            return self.handle is None or bool(self.backend.hvd.poll(self.handle))
        except Exception:
            return True  # wait() raises it

    def wait(self) -> None:
        if self.error is not None:
            raise self.error
        if self.handle is not None:
            self.backend._wait(self.handle, "Horovod allreduce")

    def abandon(self) -> None:
        if self.handle is None:
            return
        finished = self.done()
        handle, self.handle = self.handle, None
        if finished:
            with contextlib.suppress(Exception):  # finished: release it, Horovod goes on
                self.backend.hvd.synchronize(handle)
                return
        self.backend.abandoned = handle  # it may still write: Horovod restarts first


class HorovodBackend(MPIBackend):
    """Horovod collectives, with Horovod initialised on the workers' communicator only.

    Gradient averaging goes through Horovod's allreduce (its tensor fusion, its fp16 sum);
    waits poll Horovod's handles against the same deadline as every other ftmpi wait. Barriers
    stay on MPI (same communicator), so they too have a timeout.

    Horovod runs on a duplicate of the workers' communicator, and duplicates that again
    (``horovod_init_multi_comm`` and ``MPIContext::Initialize``), so the revoke of a recovery
    never reaches the communicators Horovod's background thread uses: after a recovery that
    leaves the workers as they were, Horovod carries on (:meth:`rebind`). After one that
    changes them, :meth:`stop` shuts it down and a new instance initialises it on the new
    workers' communicator (see :func:`rebuild_backend`).
    """

    name = "horovod"

    def __init__(self, comm: MPI.Comm, timeout: float) -> None:
        super().__init__(comm, timeout)
        import horovod.torch as hvd  # optional dependency: only where this backend is chosen
        from horovod.common.exceptions import HorovodInternalError

        self.hvd = hvd
        self._internal_error = HorovodInternalError
        self.abandoned: int | None = None
        """A handle this worker stopped waiting for when a recovery began: its collective may
        still complete later, into the tensor it was given, so Horovod must be restarted."""
        self.broken = False
        """Horovod reported an internal error (a worker died under it): it has shut down."""
        self._dup = comm.Dup()  # its own communicator: its collectives never interleave ours
        hvd.init(comm=self._dup)
        if hvd.size() != comm.Get_size():  # pragma: no cover - Horovod misconfiguration
            raise RuntimeError(
                f"Horovod sees {hvd.size()} ranks; there are {comm.Get_size()} workers"
            )

    @property
    def needs_restart(self) -> bool:
        """Whether Horovod must be shut down and initialised again before its next collective
        (a collective was abandoned, or Horovod failed)."""
        return self.broken or self.abandoned is not None

    def rebind(self, comm: MPI.Comm) -> None:
        """Keep Horovod and watch ``comm`` (the new workers' communicator, same members) for
        revokes; barriers and byte broadcasts use it too."""
        self.comm = comm

    def stop(self) -> bool:
        """Shut Horovod down (collective among the workers of the old view that still run
        Horovod; its background thread agrees on the shutdown with theirs, or fails on a dead
        peer and ends). Returns whether it stopped within the timeout; if not, Horovod's
        thread is stuck in an MPI call and this process cannot use Horovod again."""
        done = threading.Event()

        def shutdown() -> None:
            self.hvd.shutdown()
            done.set()

        threading.Thread(target=shutdown, name="ftmpi-horovod-shutdown", daemon=True).start()
        if not done.wait(self.timeout):
            return False
        with contextlib.suppress(MPI.Exception):  # Horovod worked on duplicates of it
            self._dup.Free()
        self.abandoned = None  # horovod.torch's shutdown cleared every handle and its tensor
        return True

    def _wait(self, handle: int, what: str) -> torch.Tensor:
        """Wait for a Horovod collective. Horovod does not see ULFM: a worker that is waiting
        here when another worker starts a recovery (a server died) would wait for a peer that
        is no longer coming, so the workers' communicator is watched too: once the recovery
        has revoked it, this raises ``PeerFailure`` and the worker joins the recovery. The
        abandoned handle is kept (:attr:`abandoned`): the recovery restarts Horovod."""
        deadline = time.monotonic() + self.timeout
        sleep = 20e-6
        try:
            while not self.hvd.poll(handle):
                if time.monotonic() > deadline:
                    self.abandoned = handle
                    raise CommTimeout(f"{what}: no completion within {self.timeout:g} s")
                if self.comm.Is_revoked():
                    self.abandoned = handle
                    raise PeerFailure(f"{what}: a recovery began", MPI.ERR_REVOKED)
                time.sleep(sleep)
                sleep = min(sleep * 2, 200e-6)
            result: torch.Tensor = self.hvd.synchronize(handle)
            return result
        except self._internal_error as exc:  # a peer failed under Horovod: recover like MPI
            self.broken = True
            raise PeerFailure(f"{what}: {exc}", MPI.ERR_PROC_FAILED) from exc

    def _start(self, fn: Callable[..., int], *args: object, **kwargs: object) -> int:
        try:
            return int(fn(*args, **kwargs))
        except self._internal_error as exc:
            self.broken = True
            raise PeerFailure(f"Horovod: {exc}", MPI.ERR_PROC_FAILED) from exc

    def allreduce_(self, t: torch.Tensor, *, average: bool, predivide: float = 1.0) -> None:
        self.start_allreduce_(t, average=average, predivide=predivide, name="").wait()

    def start_allreduce_(
        self, t: torch.Tensor, *, average: bool, predivide: float = 1.0, name: str
    ) -> PendingReduce:
        hvd = self.hvd
        if average:
            op, pre, post = hvd.Average, 1.0 / predivide, predivide
        else:
            op, pre, post = hvd.Sum, 1.0, 1.0
        try:
            handle = self._start(
                hvd.allreduce_async_,
                t,
                name=f"ftmpi.gradients{name}",
                op=op,
                prescale_factor=pre,
                postscale_factor=post,
            )
        except PeerFailure as exc:
            return _HorovodReduce(self, None, exc)
        return _HorovodReduce(self, handle, None)

    def broadcast_(self, t: torch.Tensor, root: int) -> None:
        if t.dtype in _MPI_TYPES:
            handle = self._start(
                self.hvd.broadcast_async_, t, root_rank=root, name=f"ftmpi.bcast.{t.numel()}"
            )
            self._wait(handle, "Horovod broadcast")
        else:
            super().broadcast_(t, root)


def horovod_available() -> bool:
    """Whether ``horovod.torch`` can be imported (built with MPI)."""
    if importlib.util.find_spec("horovod") is None:
        return False
    try:
        import horovod.torch as hvd
    except ImportError:
        return False
    return bool(hvd.mpi_built())


def _horovod_job(rt: Runtime) -> bool:
    """Whether this job's workers run Horovod (``backend`` horovod, or auto with Horovod
    installed): the same answer on every worker, joiners included."""
    choice = rt.config.backend
    return choice == "horovod" or (choice == "auto" and horovod_available())


def select_backend(rt: Runtime) -> CollectiveBackend:
    """The backend the config asks for on this worker's communicator.

    ``auto`` picks Horovod when it is installed, else MPI. ``horovod`` without Horovod
    installed raises ``RuntimeError`` saying how to install it. A replacement worker joining
    a Horovod job takes part in the survivors' agreement of :func:`rebuild_backend` and runs
    Horovod with them (MPI where they cannot restart Horovod). Raises ``PeerFailure`` or
    ``CommTimeout`` if a worker dies or stops answering during the agreement.
    """
    if rt.config.backend == "horovod" and not horovod_available():
        raise RuntimeError(
            "backend='horovod' but horovod.torch (with MPI) is not importable; "
            "install it with scripts/install-horovod.sh or use backend='mpi'"
        )
    if not _horovod_job(rt):
        return MPIBackend(rt.group, rt.config.timeout)
    if rt.late_joiner and not _agree(rt, 1, MPI.MIN):
        return MPIBackend(rt.group, rt.config.timeout)
    with deadline(rt.config, rt.role, "initialising Horovod on the workers' communicator"):
        return HorovodBackend(rt.group, rt.config.timeout)


_horovod_stuck = False
"""Set when Horovod's shutdown did not finish: its thread is stuck in an MPI call and this
process cannot initialise Horovod again."""


def _agree(rt: Runtime, flag: int, op: MPI.Op) -> int:
    """``flag`` reduced with ``op`` over the new view's workers (MPI, with a deadline long
    enough to cover a peer's Horovod shutdown). Raises ``PeerFailure``/``CommTimeout``."""
    value = np.array([flag], dtype=np.int64)
    with mpi_errors("agreeing on the collective backend"):
        req = rt.group.Iallreduce(MPI.IN_PLACE, value, op=op)
    wait_all([req], 2 * rt.config.timeout, "agreeing on the collective backend")
    return int(value[0])


def rebuild_backend(rt: Runtime, *, workers_changed: bool) -> None:
    """Give the workers the collective backend for the new view after a recovery (every
    worker of the new view calls it, replacement workers through :func:`select_backend`).

    - MPI backend: the same collectives over the new workers' communicator; nothing to agree
      on, so a worker that has finished (it waits at the exit barrier, :func:`ftmpi.lifecycle.
      release`, and joins the recovery there) need not take part while others still train.
    - Horovod, workers unchanged (a server died): Horovod's communicators were never touched
      (it works on duplicates of a duplicate, which the recovery's revoke does not reach), so
      Horovod stays, watching the new communicator for revokes. Unless a worker abandoned a
      Horovod collective when the recovery began (it could still complete later, into a
      gradient buffer): the workers agree on that, and then restart Horovod as below.
    - Horovod, workers changed (a worker died or joined): ``hvd.shutdown()`` on the survivors
      (their background threads agree on it, or fail on the dead peer and end), then
      ``hvd.init`` on the new workers' communicator, event ``backend_restarted``. If a
      shutdown does not finish within the timeout (Horovod's thread stuck in an MPI call it
      cannot leave), every worker continues on the MPI backend, event ``backend_fallback``.

    Every worker takes the same decision. Raises ``PeerFailure`` (the recovery starts over)
    or ``CommTimeout`` when a worker dies or stops answering meanwhile; a Horovod
    initialisation that does not return within the timeout ends the process
    (:func:`~ftmpi.guards.deadline`).
    """
    global _horovod_stuck
    backend = rt.backend
    if not _horovod_job(rt):
        rt.backend = MPIBackend(rt.group, rt.config.timeout)
        return
    unchanged = not workers_changed
    if (
        isinstance(backend, HorovodBackend)
        and unchanged
        and not _agree(rt, int(backend.needs_restart), MPI.MAX)
    ):
        backend.rebind(rt.group)
        return
    usable = not _horovod_stuck
    if isinstance(backend, HorovodBackend):
        usable = backend.stop()
        _horovod_stuck = not usable
    role = f"worker {rt.role_rank}"
    if _agree(rt, int(usable), MPI.MIN):
        with deadline(rt.config, rt.role, "initialising Horovod on the new workers' communicator"):
            rt.backend = HorovodBackend(rt.group, rt.config.timeout)
        events.emit(
            rt.config.run_dir,
            "backend_restarted",
            role=role,
            workers=rt.num_workers,
            detail="Horovod initialised again on the new workers' communicator"
            + (" (the worker set changed)" if workers_changed else " (a collective was cut)"),
        )
        return
    detail = (
        "continuing on the MPI backend: Horovod's shutdown did not finish within "
        f"{rt.config.timeout:g} s on some worker (its background thread is stuck in an MPI "
        "call on a communicator with a failed peer), so Horovod cannot be initialised again"
    )
    if rt.role_rank == 0:
        print(f"ftmpi: {detail}", file=sys.stderr, flush=True)
    events.emit(rt.config.run_dir, "backend_fallback", role=role, detail=detail)
    rt.backend = MPIBackend(rt.group, rt.config.timeout)
