"""Gradient averaging during backward (``overlap``) against a single-process reference: every
step's weights equal one process applying the same optimizer to the workers' averaged gradients.
Run under mpirun with FTMPI_SERVERS / FTMPI_PLACEMENT / FTMPI_OVERLAP / FTMPI_BUCKET_BYTES set.

    overlap.py CASE STEPS

CASE: ``plain``; ``unused`` (a layer outside the loss: no gradient, no hook; its zeros are copied
in at the step); ``frozen`` (a layer with requires_grad False); ``accumulate`` (two backward
passes per step, backward_passes_per_step=2); ``synchronize`` (synchronize(), a
change to the averaged gradient, step() inside skip_synchronize()); ``twice`` (two backward
passes with backward_passes_per_step=1: step() raises). Worker 0 prints one JSON line: the
largest difference from the reference, and how many buckets started inside backward.
"""

import json
import sys

import numpy as np
import torch

import ftmpi
from ftmpi.fatal import UserError


class Net(torch.nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.a = torch.nn.Linear(20, 64)
        self.b = torch.nn.Linear(64, 32)
        self.extra = torch.nn.Linear(32, 32)
        self.c = torch.nn.Linear(32, 5)
        self.case = case
        if case == "frozen":
            self.b.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.c(h if self.case == "unused" else torch.tanh(self.extra(h)))


def batch(step: int, rank: int, part: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + part)
    return torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)


def main() -> None:
    case, steps = sys.argv[1], int(sys.argv[2])
    ftmpi.init()
    me, workers = ftmpi.rank(), ftmpi.size()
    comm = ftmpi.runtime().group
    passes = 2 if case == "accumulate" else 1
    model, ref = Net(case), Net(case)
    opt = ftmpi.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        named_parameters=model.named_parameters(),
        backward_passes_per_step=passes,
    )
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    params = [p for _, p in model.named_parameters()]
    in_backward = 0
    diff = 0.0
    for step in range(steps):
        opt.zero_grad()
        for part in range(2 if case in ("accumulate", "twice") else 1):
            x, y = batch(step, me, part)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        buckets = opt._ftmpi_buckets
        in_backward += 0 if buckets is None else buckets.next
        local = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        ).numpy()
        every = np.empty((workers, local.size), dtype=local.dtype)
        comm.Allgather(local, every)
        if case == "twice":
            try:
                opt.step()
            except UserError as exc:
                if me == 0:
                    print(json.dumps({"error": str(exc)}), flush=True)
                return
        elif case == "synchronize":
            opt.synchronize()
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(0.5)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        avg = torch.from_numpy(every[0].copy())
        for w in range(1, workers):
            avg = avg + torch.from_numpy(every[w].copy())
        avg = avg / workers
        if case == "synchronize":
            avg = avg * 0.5
        off = 0
        for name, p in ref.named_parameters():
            n = p.numel()
            # a parameter without a gradient on every worker is skipped by SGD, as in the model
            skipped = {"unused": "extra", "frozen": "b"}.get(case)
            used = name.split(".")[0] != skipped
            p.grad = avg[off : off + n].view_as(p).clone() if used else None
            off += n
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            diff = max(diff, float((p.detach() - q.detach()).abs().max()))
    if me == 0:
        print(json.dumps({"max_abs_diff": diff, "in_backward": in_backward}), flush=True)


main()
