"""Collective backends: how workers average gradients and share tensors among themselves.

Workers only: servers never take part. A backend works on contiguous CPU tensors in place. Every
call either completes, raises :class:`~ftmpi.wire.CommTimeout` after the configured timeout, or
raises :class:`~ftmpi.wire.PeerFailure` when a worker died (under ULFM).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import TYPE_CHECKING, Protocol

import torch
from mpi4py import MPI

from ftmpi.wire import CommTimeout, PeerFailure, mpi_errors, wait_all

if TYPE_CHECKING:
    from ftmpi.runtime import Runtime

_MPI_TYPES = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}


class CollectiveBackend(Protocol):
    """What the worker side needs from a collective library."""

    name: str

    def size(self) -> int: ...

    def rank(self) -> int: ...

    def allreduce_(self, t: torch.Tensor, *, average: bool, predivide: float = 1.0) -> None:
        """Sum ``t`` across workers in place; divide by the worker count if ``average``.

        ``predivide`` (Horovod's ``gradient_predivide_factor``, average only) divides before the
        sum and multiplies back after it."""
        ...

    def broadcast_(self, t: torch.Tensor, root: int) -> None:
        """Overwrite ``t`` on every worker with ``t`` on worker ``root``."""
        ...

    def barrier(self) -> None: ...


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
        if average and predivide != 1.0:
            t.div_(predivide)
        if self.size() > 1:
            with mpi_errors("worker allreduce"):
                req = self.comm.Iallreduce(MPI.IN_PLACE, self._buf(t), op=MPI.SUM)
            wait_all([req], self.timeout, "worker allreduce")
        if average:
            if predivide != 1.0:
                t.mul_(predivide)
            t.div_(self.size())

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


class HorovodBackend(MPIBackend):
    """Horovod collectives, with Horovod initialised on the workers' communicator only.

    Gradient averaging goes through Horovod's allreduce (its tensor fusion, its fp16 sum);
    waits poll Horovod's handles against the same deadline as every other ftmpi wait. Barriers
    stay on MPI (same communicator), so they too have a timeout.
    """

    name = "horovod"

    def __init__(self, comm: MPI.Comm, timeout: float) -> None:
        super().__init__(comm, timeout)
        import horovod.torch as hvd
        from horovod.common.exceptions import HorovodInternalError

        self.hvd = hvd
        self._internal_error = HorovodInternalError
        hvd.init(comm=comm.Dup())  # its own communicator: its collectives never interleave ours
        if hvd.size() != comm.Get_size():  # pragma: no cover - Horovod misconfiguration
            raise RuntimeError(
                f"Horovod sees {hvd.size()} ranks; there are {comm.Get_size()} workers"
            )

    def _wait(self, handle: int, what: str) -> torch.Tensor:
        """Wait for a Horovod collective. Horovod does not see ULFM: a worker that is waiting
        here when another worker starts a recovery (a server died) would wait for a peer that
        is no longer coming, so the workers' communicator is watched too: once the recovery
        has revoked it, this raises ``PeerFailure`` and the worker joins the recovery."""
        deadline = time.monotonic() + self.timeout
        sleep = 20e-6
        try:
            while not self.hvd.poll(handle):
                if time.monotonic() > deadline:
                    raise CommTimeout(f"{what}: no completion within {self.timeout:g} s")
                if self.comm.Is_revoked():
                    raise PeerFailure(f"{what}: a recovery began", MPI.ERR_REVOKED)
                time.sleep(sleep)
                sleep = min(sleep * 2, 200e-6)
            return self.hvd.synchronize(handle)
        except self._internal_error as exc:  # a peer failed under Horovod: recover like MPI
            raise PeerFailure(f"{what}: {exc}", MPI.ERR_PROC_FAILED) from exc

    def _start(self, fn, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
        try:
            return fn(*args, **kwargs)
        except self._internal_error as exc:
            raise PeerFailure(f"Horovod: {exc}", MPI.ERR_PROC_FAILED) from exc

    def allreduce_(self, t: torch.Tensor, *, average: bool, predivide: float = 1.0) -> None:
        hvd = self.hvd
        if average:
            op, pre, post = hvd.Average, 1.0 / predivide, predivide
        else:
            op, pre, post = hvd.Sum, 1.0, 1.0
        handle = self._start(
            hvd.allreduce_async_,
            t,
            name="ftmpi.gradients",
            op=op,
            prescale_factor=pre,
            postscale_factor=post,
        )
        self._wait(handle, "Horovod allreduce")

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


def select_backend(rt: Runtime) -> CollectiveBackend:
    """The backend the config asks for on this worker's communicator.

    ``auto`` picks Horovod when it is installed, else MPI. ``horovod`` without Horovod
    installed raises ``RuntimeError`` saying how to install it.
    """
    choice = rt.config.backend
    if choice == "auto":
        choice = "horovod" if horovod_available() else "mpi"
    if choice == "horovod":
        if not horovod_available():
            raise RuntimeError(
                "backend='horovod' but horovod.torch (with MPI) is not importable; "
                "install it with scripts/install-horovod.sh or use backend='mpi'"
            )
        return HorovodBackend(rt.group, rt.config.timeout)
    return MPIBackend(rt.group, rt.config.timeout)


def rebuild_backend(rt: Runtime, *, workers_changed: bool) -> None:
    """Give the workers the collective backend for the new view after a recovery.

    Horovod cannot change its membership, and its background thread does not survive the
    revoke/shrink/spawn of a recovery, so after any failure ftmpi continues on the MPI backend
    over the new workers' communicator (the same decision on every worker, recorded as an
    event). The averages are the same sums divided by the same counts.
    """
    from ftmpi import events

    # the node-local worker communicator changes with the workers (a joining worker's
    # ftmpi.init() takes part in this split)
    rt.local = rt.group.Split_type(MPI.COMM_TYPE_SHARED, key=rt.group.Get_rank())
    rt.local.Set_errhandler(MPI.ERRORS_RETURN)
    rt.comms.append(rt.local)
    if isinstance(rt.backend, HorovodBackend):
        if rt.role_rank == 0:
            print(
                "ftmpi: continuing on the MPI backend after a failure (Horovod cannot change "
                "its membership, and its background thread does not survive the recovery)",
                file=sys.stderr,
                flush=True,
            )
        events.emit(
            rt.config.run_dir,
            "backend_fallback",
            role=f"worker {rt.role_rank}",
            detail="continuing on the MPI backend after a failure"
            + (" (the worker set changed)" if workers_changed else ""),
        )
    rt.backend = MPIBackend(rt.group, rt.config.timeout)
