"""A model on the GPU (``cuda:0``) trained with ftmpi for STEPS steps on per-step random
batches; worker 0 prints one JSON line: the final weights' SHA-256 and each parameter's sum
(for comparisons within a tolerance).

    gpu_train.py STEPS
"""

import argparse
import hashlib
import json

import torch
import torch.nn.functional as F

import ftmpi
from ftmpi.models import SyntheticMLP

p = argparse.ArgumentParser()
p.add_argument("steps", type=int)
args = p.parse_args()

ftmpi.init()
me = ftmpi.rank()
device = torch.device("cuda", 0)
torch.manual_seed(0)
model = SyntheticMLP(200_000, 784, 10).to(device)
opt = ftmpi.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
    named_parameters=model.named_parameters(),
)
for step in range(args.steps):
    gen = torch.Generator().manual_seed(1000 * step + me)
    x = torch.randn(32, 784, generator=gen).to(device)
    y = torch.randint(0, 10, (32,), generator=gen).to(device)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
stats = opt.server_stats()
if me == 0:
    h = hashlib.sha256()
    sums = {}
    for name, t in sorted(model.state_dict().items()):
        h.update(t.detach().cpu().numpy().tobytes())
        sums[name] = float(t.detach().double().sum())
    print(
        json.dumps(
            {
                "device": str(next(model.parameters()).device),
                "weights": h.hexdigest(),
                "sums": sums,
                "versions": [s["version"] for s in stats],
            }
        ),
        flush=True,
    )
