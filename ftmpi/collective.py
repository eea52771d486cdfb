"""The interface of a collective backend (what the worker side needs from a collective
library), apart from its implementations (:mod:`ftmpi.backends`) so the runtime's record can
name it without importing them."""

from __future__ import annotations

from typing import Protocol

import torch


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

    def broadcast_(self, t: torch.Tensor, root: int) -> None:
        """Overwrite ``t`` on every worker with ``t`` on worker ``root``."""
        ...

    def barrier(self) -> None: ...
