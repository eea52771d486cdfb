"""Drop-in for ``horovod.torch``: ``import ftmpi.horovod as hvd`` and nothing else changes.

``hvd.init()`` becomes :func:`ftmpi.init` (server ranks serve and exit there; workers join
Horovod on the workers' communicator), ``hvd.DistributedOptimizer`` becomes
:func:`ftmpi.DistributedOptimizer`, and ``rank/size/local_rank/local_size`` and the
``broadcast_*`` helpers answer for the worker set. Every other name (``hvd.allreduce``,
``hvd.Compression``, ``hvd.Average``, ...) is Horovod's own, which works on workers because
Horovod runs on exactly the worker ranks.
"""

from __future__ import annotations

from typing import Any

import horovod.torch as _hvd

from ftmpi.broadcast import broadcast_object, broadcast_optimizer_state, broadcast_parameters
from ftmpi.lifecycle import init, shutdown
from ftmpi.optimizer import DistributedOptimizer
from ftmpi.runtime import local_rank, local_size, rank, size

Compression = _hvd.Compression
Average = _hvd.Average
Sum = _hvd.Sum

__all__ = [
    "Average",
    "Compression",
    "DistributedOptimizer",
    "Sum",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "init",
    "local_rank",
    "local_size",
    "rank",
    "shutdown",
    "size",
]


def __getattr__(name: str) -> Any:
    return getattr(_hvd, name)
