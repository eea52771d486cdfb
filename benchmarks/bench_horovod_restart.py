"""Horovod's allreduce time before and after ``hvd.shutdown()`` + ``hvd.init()``, no failure.

    .venv/bin/mpirun --oversubscribe -np 2 .venv/bin/python benchmarks/bench_horovod_restart.py

Isolates what a recovery's Horovod restart costs by itself: the median time of 300 allreduces
of 4 MB after the first ``hvd.init``, after one restart and after a second, on fresh dups of
``COMM_WORLD``.
"""

import statistics
import time

import horovod.torch as hvd
import torch
from mpi4py import MPI


def bench(label: str, n: int = 300) -> float:
    """Median seconds of ``n`` 4 MB allreduces; rank 0 prints it."""
    t = torch.ones(1 << 20)
    for _ in range(10):
        hvd.allreduce_(t, op=hvd.Sum, name="x")
    times = []
    for _ in range(n):
        s = time.perf_counter()
        hvd.allreduce_(t, op=hvd.Sum, name="x")
        times.append(time.perf_counter() - s)
    if hvd.rank() == 0:
        print(f"{label}: median {statistics.median(times) * 1e3:.3f} ms", flush=True)
    return statistics.median(times)


comm = MPI.COMM_WORLD.Dup()
hvd.init(comm=comm)
a = bench("first init")
hvd.shutdown()
comm2 = MPI.COMM_WORLD.Dup()
hvd.init(comm=comm2)
b = bench("after restart")
hvd.shutdown()
comm3 = MPI.COMM_WORLD.Dup()
hvd.init(comm=comm3)
c = bench("after 2nd restart")

if MPI.COMM_WORLD.Get_rank() == 0:
    print(f"ratio first/restart {a / b:.3f} first/2nd {a / c:.3f}")
hvd.shutdown()
