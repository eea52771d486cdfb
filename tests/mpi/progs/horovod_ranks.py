"""Horovod's own rank/size on a worker equal ftmpi's; servers never join Horovod.
Prints one JSON line per worker; worker 0 adds the servers' view."""

import json
import sys

import torch

import ftmpi.horovod as hvd

hvd.init()
import horovod.torch as real  # noqa: E402 - Horovod itself, initialised by ftmpi on the workers

model = torch.nn.Linear(4, 2)
opt = hvd.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1),
    named_parameters=model.named_parameters(),
    compression=getattr(hvd.Compression, sys.argv[1]),
)
model(torch.randn(3, 4)).sum().backward()
opt.step()
report = {
    "hvd_rank": real.rank(),
    "hvd_size": real.size(),
    "rank": hvd.rank(),
    "size": hvd.size(),
    "local_rank": hvd.local_rank(),
    "backend": "horovod" if real.is_initialized() else "?",
}
if hvd.rank() == 0:
    report["servers_in_horovod"] = [s["in_horovod"] for s in opt.server_stats()]
print(json.dumps(report), flush=True)
