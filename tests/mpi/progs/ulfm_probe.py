"""Whether this MPI survives a rank death, asked two ways: ftmpi's answer (ulfm_enabled) and
the fact (rank 1 SIGKILLs itself; rank 0 sees an MPI error instead of being aborted).

Rank 0 prints one JSON line with ftmpi's answer before the death, and one after it if it
survived."""

import json
import os
import signal
import sys

from mpi4py import MPI

from ftmpi import ompi
from ftmpi.lifecycle import ulfm_enabled
from ftmpi.wire import CommTimeout, PeerFailure, wait_all

comm = MPI.COMM_WORLD.Dup()
comm.Set_errhandler(MPI.ERRORS_RETURN)
me = comm.Get_rank()
if me == 0:
    print(json.dumps({"ulfm_enabled": ulfm_enabled()}), flush=True)
    print(json.dumps({"fence_skipped": ompi.skip_finalize_fence("rank 0")}), flush=True)
wait_all([comm.Ibarrier()], 60, "the first barrier")
if me == 1:
    os.kill(os.getpid(), signal.SIGKILL)
try:
    wait_all([comm.Ibarrier()], 60, "the barrier after the death")
except (PeerFailure, CommTimeout) as exc:
    print(json.dumps({"survived": True, "error": str(exc)}), flush=True)
    sys.exit(0)
