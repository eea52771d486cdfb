"""Collective backends: how workers average gradients and share tensors among themselves.

Workers only: servers never take part. A backend works on contiguous CPU tensors in place. Every
call either completes, raises :class:`~ftmpi.wire.CommTimeout` after the configured timeout, or
raises :class:`~ftmpi.wire.PeerFailure` when a worker died (under ULFM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from mpi4py import MPI

from ftmpi.wire import mpi_errors, wait_all

if TYPE_CHECKING:
    from ftmpi.runtime import Runtime

_MPI_TYPES = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}


class CollectiveBackend(Protocol):
    """What the worker side needs from a collective library."""

    name: str

    def size(self) -> int: ...

    def rank(self) -> int: ...

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        """Sum ``t`` across workers in place; divide by the worker count if ``average``."""
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

    def allreduce_(self, t: torch.Tensor, *, average: bool) -> None:
        if self.size() > 1:
            with mpi_errors("worker allreduce"):
                req = self.comm.Iallreduce(MPI.IN_PLACE, self._buf(t), op=MPI.SUM)
            wait_all([req], self.timeout, "worker allreduce")
        if average:
            t.div_(self.size())

    def broadcast_(self, t: torch.Tensor, root: int) -> None:
        if self.size() == 1:
            return
        with mpi_errors("worker broadcast"):
            req = self.comm.Ibcast(self._buf(t), root=root)
        wait_all([req], self.timeout, "worker broadcast")

    def barrier(self) -> None:
        with mpi_errors("worker barrier"):
            req = self.comm.Ibarrier()
        wait_all([req], self.timeout, "worker barrier")


def select_backend(rt: Runtime) -> CollectiveBackend:
    """The backend the config asks for on this worker's communicator."""
    return MPIBackend(rt.group, rt.config.timeout)
