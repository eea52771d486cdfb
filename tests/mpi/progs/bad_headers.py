"""Worker 0 sends a live server messages it must drop: another run's id, an old membership
view, an unknown kind, each carrying a huge "gradient". Prints one JSON line per worker: the
weights' hash and the server's version before and after, and the server's dropped count.

    bad_headers.py
"""

import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F

import ftmpi
from ftmpi import wire
from ftmpi.wire import Header, Kind

rt = ftmpi.init()
me = ftmpi.rank()
torch.manual_seed(0)
model = torch.nn.Linear(8, 2)
opt = ftmpi.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters()
)
x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))


def step() -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def digest() -> str:
    opt.pull()
    return hashlib.sha256(
        b"".join(t.detach().numpy().tobytes() for _, t in sorted(model.state_dict().items()))
    ).hexdigest()


for _ in range(3):
    step()
before, version_before = digest(), opt.server_stats()[0]["version"]
if me == 0:
    server = rt.servers[0]
    numel = sum(p.numel() for p in model.parameters())
    poison = np.full(numel, 1e30, dtype=np.float32)
    for kind, run, view in [
        (Kind.PUSH, rt.run ^ 0x5A5A, rt.view),  # another run
        (Kind.PUSH, rt.run, rt.view - 1),  # an old membership view
        (99, rt.run, rt.view),  # no such kind
    ]:
        header = Header(int(kind), run, version_before, 0, 1, view, poison.nbytes)
        wire.send(
            rt.world,
            server,
            header,
            poison,
            tag=wire.TAG_HEADER,
            data_tag=wire.TAG_DATA,
            chunk_bytes=rt.config.chunk_bytes,
            timeout=30,
            what="a message to drop",
        )
stats = opt.server_stats()[0]  # answered after worker 0's messages (MPI keeps their order)
after = digest()
step()  # the server still serves
print(
    json.dumps(
        {
            "worker": me,
            "before": before,
            "after": after,
            "version_before": version_before,
            "version_after": stats["version"],
            "dropped": stats["dropped"],
            "final_version": opt.server_stats()[0]["version"],
        }
    ),
    flush=True,
)
