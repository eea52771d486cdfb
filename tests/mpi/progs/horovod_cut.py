"""A Horovod collective cut by a recovery on one worker only, then ``rebuild_backend`` with the
workers unchanged. Worker 0 starts an allreduce; worker 1 revokes the workers' communicator
instead (as a worker starting a recovery does), so worker 0 abandons a collective that worker
1 never started. Both then move to a new communicator (same members) and rebuild the backend.

    horovod_cut.py cut|clean

``clean``: nobody abandons anything (Horovod must be kept as it is). Each worker prints one
JSON line: whether the backend object was kept, its name, a Horovod allreduce after it, and
whether the abandoned tensor was ever written.
"""

import json
import sys
import time
from types import SimpleNamespace

import torch
from mpi4py import MPI

from ftmpi.backends import HorovodBackend, rebuild_backend
from ftmpi.wire import PeerFailure

cut = sys.argv[1] == "cut"
world = MPI.COMM_WORLD
world.Set_errhandler(MPI.ERRORS_RETURN)
me = world.Get_rank()
group = world.Dup()
group.Set_errhandler(MPI.ERRORS_RETURN)
config = SimpleNamespace(backend="horovod", timeout=20.0, run_dir="")
backend = HorovodBackend(group, config.timeout)
rt = SimpleNamespace(
    group=group,
    local=None,
    comms=[],
    config=config,
    backend=backend,
    role_rank=me,
    role=f"worker {me}",
    late_joiner=False,
    num_workers=world.Get_size(),
)
backend.allreduce_(torch.ones(4), average=False)  # Horovod works before
abandoned = torch.full((1000,), float(me + 1))
raised = ""
if cut:
    if me == 0:
        try:
            backend.allreduce_(abandoned, average=False)
        except PeerFailure as exc:
            raised = str(exc)
    else:
        # worker 0's allreduce is left unmatched whichever comes first: waiting in it, it is
        # woken by the revoke; starting it after, its wait sees the group revoked at once
        time.sleep(0.5)
        group.Revoke()
world.Barrier()
rt.group = world.Dup()  # the recovery's new workers' communicator, same members
rt.group.Set_errhandler(MPI.ERRORS_RETURN)
rebuild_backend(rt, workers_changed=False)
after = torch.full((1000,), float(me + 1))
rt.backend.allreduce_(after, average=False)
# an absence to check: give an abandoned collective that completes late time to write
time.sleep(0.5)
print(
    json.dumps(
        {
            "worker": me,
            "kept": rt.backend is backend,
            "backend": rt.backend.name,
            "raised": raised,
            "after": sorted(set(after.tolist())),
            "abandoned_written": sorted(set(abandoned.tolist())) != [float(me + 1)],
        }
    ),
    flush=True,
)
