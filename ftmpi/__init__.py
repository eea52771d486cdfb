"""ftmpi: fault-tolerant data-parallel PyTorch training with parameter-server ranks beside
Horovod/MPI workers in one MPI job.

Typical use, the same script on every rank::

    import ftmpi
    ftmpi.init()                       # server ranks serve here and exit
    opt = ftmpi.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    ... train as usual; ftmpi.rank() / ftmpi.size() answer for the workers ...

Importing this package does not initialise MPI; :func:`init` does.
"""

from typing import Any

from ftmpi.config import Config, ConfigError
from ftmpi.lifecycle import init, shutdown
from ftmpi.loop import Rollback, TrainingState, run
from ftmpi.repro import seed_step
from ftmpi.runtime import Runtime, local_rank, local_size, rank, runtime, size

_LAZY = {  # names whose modules import mpi4py.MPI (which initialises MPI)
    "Compression": "ftmpi.compression",
    "broadcast_parameters": "ftmpi.broadcast",
    "broadcast_optimizer_state": "ftmpi.broadcast",
    "broadcast_object": "ftmpi.broadcast",
    "Average": "ftmpi.optimizer",
    "DistributedOptimizer": "ftmpi.optimizer",
    "ReduceOp": "ftmpi.optimizer",
    "Sum": "ftmpi.optimizer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ftmpi' has no attribute {name!r}")


__all__ = [
    "Average",
    "Compression",
    "Config",
    "ConfigError",
    "DistributedOptimizer",
    "ReduceOp",
    "Rollback",
    "Runtime",
    "Sum",
    "TrainingState",
    "__version__",
    "broadcast_object",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "init",
    "local_rank",
    "local_size",
    "rank",
    "run",
    "runtime",
    "seed_step",
    "shutdown",
    "size",
]

__version__ = "0.1.0"
