"""Allreduce time between two ranks of the job, and between a rank and a re-spawned one.

    .venv/bin/mpirun --oversubscribe -np 2 .venv/bin/python benchmarks/bench_spawn_transport.py

A replacement joins through ``MPI_Comm_spawn`` + merge. Open MPI's shared-memory transport
(btl/sm) does not reach processes of another job (open-mpi/ompi#6823), so a spawned rank talks
to the job's own ranks over TCP even on the same host; this prints the cost of that per 4 MB
allreduce (``--mca btl self,sm`` makes the spawned rank unreachable, which shows it).
"""

import sys
import time

import numpy as np
from mpi4py import MPI


def bench(comm: MPI.Intracomm, label: str) -> None:
    """Time 60 allreduces of 4 MB on ``comm``; its rank 0 prints the mean."""
    buf = np.ones(1 << 20, dtype=np.float32)  # 4 MB
    out = np.empty_like(buf)
    comm.Barrier()
    for _ in range(5):
        comm.Allreduce(buf, out)
    comm.Barrier()
    t = time.perf_counter()
    n = 60
    for _ in range(n):
        comm.Allreduce(buf, out)
    dt = (time.perf_counter() - t) / n
    if comm.Get_rank() == 0:
        print(f"{label}: {dt * 1e3:.2f} ms per 4 MB allreduce", flush=True)


parent = MPI.Comm.Get_parent()
if parent == MPI.COMM_NULL:  # the job's own two ranks
    world = MPI.COMM_WORLD
    bench(world, "original ranks (np=2)")
    inter = world.Spawn(sys.executable, args=[__file__], maxprocs=1, root=0)
    merged = inter.Merge(high=False)  # ranks: 0, 1, then the spawned one
    paired = merged.Get_rank() == 0
    pair = merged.Split(0 if paired else 1, merged.Get_rank())
    if paired:
        bench(pair, "rank 0 + spawned rank")
    merged.Barrier()
else:  # the spawned rank: pairs with rank 0
    merged = parent.Merge(high=True)
    pair = merged.Split(0, merged.Get_rank())
    bench(pair, "spawned")
    merged.Barrier()
