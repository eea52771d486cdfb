"""Sync mode is bit-exact: ftmpi's weights equal one process applying the same optimizer to the
averaged gradients. Run under mpirun with FTMPI_SERVERS set; prints a JSON line on worker 0."""

import json
import sys

import numpy as np
import torch

import ftmpi

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-4),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(
        torch.nn.Linear(20, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 5),
    )


def main() -> None:
    name, steps = sys.argv[1], int(sys.argv[2])
    ftmpi.init()
    me, workers = ftmpi.rank(), ftmpi.size()
    comm = ftmpi.runtime().group
    model = make_model()
    base = OPTIMIZERS[name](model.parameters())
    opt = ftmpi.DistributedOptimizer(base, named_parameters=model.named_parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ref_model = make_model()
    ref_opt = OPTIMIZERS[name](ref_model.parameters())
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.5)
    for step in range(steps):
        gen = torch.Generator().manual_seed(1000 * step + me)
        x = torch.randn(16, 20, generator=gen)
        y = torch.randint(0, 5, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        local = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
        gathered = np.empty((workers, local.size), dtype=local.dtype)
        comm.Allgather(local, gathered)
        opt.step()
        sched.step()
        # reference: one process, averaged gradient, same optimizer
        avg = torch.from_numpy(gathered[0].copy())
        for w in range(1, workers):
            avg = avg + torch.from_numpy(gathered[w].copy())
        avg = avg / workers
        off = 0
        for p in ref_model.parameters():
            p.grad = avg[off : off + p.numel()].view_as(p).clone()
            off += p.numel()
        ref_opt.step()
        ref_sched.step()
    mismatched = [
        n
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    if me == 0:
        stats = opt.server_stats()
        print(
            json.dumps(
                {
                    "optimizer": name,
                    "steps": steps,
                    "mismatched": mismatched,
                    "applied": [s["applied"] for s in stats],
                    "shards": [[sl.name for sl in s.slots] for s in opt.shards],
                    "max_abs_diff": max(
                        float((p - q).abs().max().detach())
                        for p, q in zip(model.parameters(), ref_model.parameters(), strict=False)
                    ),
                }
            )
        )


if __name__ == "__main__":
    main()
