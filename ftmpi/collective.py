"""The interface of a collective backend (what the worker side needs from a collective
library), apart from its implementations (:mod:`ftmpi.backends`) so the runtime's record can
name it without importing them."""

from __future__ import annotations

from typing import Protocol

import torch


class PendingReduce(Protocol):
    """An allreduce started by :meth:`CollectiveBackend.start_allreduce_`."""

    def done(self) -> bool:
        """Whether it has completed (and let it progress); never raises: a failure shows in
        :meth:`wait`."""
        ...

    def wait(self) -> None:
        """Wait for it and finish the tensor (the average's division); raises
        :class:`~ftmpi.wire.PeerFailure` or :class:`~ftmpi.wire.CommTimeout` as a backend's
        calls do, and then the tensor's contents are undefined."""
        ...

    def abandon(self) -> None:
        """Stop waiting for it after a failure; the memory it writes is kept until the library
        is done with it (the next reduction of the tensor starts from the gradients again)."""
        ...


class CollectiveBackend(Protocol):
    """What the worker side needs from a collective library.

    Every call either completes, raises :class:`~ftmpi.wire.CommTimeout` after the configured
    timeout, or raises :class:`~ftmpi.wire.PeerFailure` when a worker died (under ULFM)."""

    name: str

    def size(self) -> int: ...

    def rank(self) -> int: ...

    def allreduce_(self, t: torch.Tensor, *, average: bool, predivide: float = 1.0) -> None:
        """Sum ``t`` across workers in place; divide by the worker count if ``average``.

        ``predivide`` (Horovod's ``gradient_predivide_factor``, average only) divides before the
        sum and multiplies back after it."""
        ...

    def start_allreduce_(
        self, t: torch.Tensor, *, average: bool, predivide: float = 1.0, name: str
    ) -> PendingReduce:
        """Start :meth:`allreduce_` on ``t`` and return at once; ``t`` holds the result after
        ``wait()``. ``name``: the same on every worker for the same tensor (Horovod matches
        tensors by name). Non-blocking collectives start in the same order on every worker."""
        ...

    def broadcast_(self, t: torch.Tensor, root: int) -> None:
        """Overwrite ``t`` on every worker with ``t`` on worker ``root``."""
        ...

    def barrier(self) -> None: ...
