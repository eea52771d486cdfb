"""A small fault-tolerance workload: an MLP with dropout on synthetic data, trained with
ftmpi.run so rollbacks replay the same batches. Worker 0 prints one JSON line at the end.

    ft_train.py STEPS [--corrupt-at STEP] [--usr1-at STEP] [--step-sleep S] [--hidden N]
                      [--raise-at STEP [--raise-worker W]] [--op sum] [--synchronize]
                      [--await-replacements]

--corrupt-at: worker 0 truncates the newest snapshot; --usr1-at: worker 0 sends itself SIGUSR1
(a checkpoint request); --step-sleep: extra seconds per step (to span a server's down time);
--hidden: width of the hidden layer (another model, e.g. to resume from a mismatched snapshot);
--raise-at: worker --raise-worker (default 1) raises ValueError at that step (a bug on one rank).
--op sum: reduce gradients with Sum instead of Average; --synchronize: every step calls
optimizer.synchronize() and then step() inside skip_synchronize(), as a loop that clips does.
--await-replacements: while a rank is down every step sleeps 0.2 s more, and worker 0 holds
the last step until the replacement has started, so the run admits it before it ends (ftmpi
spawns replacements in the background and admits them at a step boundary; training does not
wait for them, so a short run could otherwise end first).
"""

import argparse
import hashlib
import json
import os
import signal
import time

import torch
import torch.nn.functional as F

import ftmpi
from ftmpi.membership import SPAWN_ATTEMPTS, replacements_due
from ftmpi.sampler import ShardedBatches, step_seed
from ftmpi.snapshot import list_versions, snapshot_path

p = argparse.ArgumentParser()
p.add_argument("steps", type=int)
p.add_argument("--corrupt-at", type=int, default=0)
p.add_argument("--usr1-at", type=int, default=0, help="worker 0 sends itself SIGUSR1 here")
p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of extra work per step")
p.add_argument("--hidden", type=int, default=64, help="width of the hidden layer")
p.add_argument("--raise-at", type=int, default=-1, help="a worker raises ValueError here")
p.add_argument("--raise-worker", type=int, default=1, help="the worker that raises")
p.add_argument("--op", choices=("average", "sum"), default="average")
p.add_argument("--synchronize", action="store_true", help="synchronize, then skip_synchronize")
p.add_argument(
    "--await-replacements", action="store_true", help="admit replacements before the end"
)
args = p.parse_args()

rt = ftmpi.init()
me, workers = ftmpi.rank(), ftmpi.size()
gen = torch.Generator().manual_seed(0)
x = torch.randn(512, 20, generator=gen)
y = (x[:, :5].sum(1) > 0).long() + 2 * (x[:, 5:10].sum(1) > 0).long()
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(20, args.hidden),
    torch.nn.ReLU(),
    torch.nn.Dropout(0.2),
    torch.nn.Linear(args.hidden, 4),
)
opt = ftmpi.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    named_parameters=model.named_parameters(),
    op=ftmpi.Sum if args.op == "sum" else ftmpi.Average,
)
batches = ShardedBatches(x, y, 16, worker=me, workers=workers, seed=0)
computed = 0


def await_replacements(step):
    """--await-replacements (see the module docstring)."""
    if not (rt.down_since or rt.workers_down):
        return
    time.sleep(0.2)
    if step != args.steps - 1 or me != 0:
        return
    deadline = time.monotonic() + 120
    while (rt.down_since or rt.workers_down) and time.monotonic() < deadline:
        if replacements_due(rt):  # starts a due spawn, again after one that never came up
            return
        if rt.spawning is None and rt.spawn_failures >= SPAWN_ATTEMPTS:
            return  # none came up: the slot stays down
        time.sleep(0.05)


@ftmpi.run
def train(state):
    global computed
    for step, xb, yb in state.batches:
        if step >= args.steps:
            return
        if args.await_replacements:
            await_replacements(step)
        if args.corrupt_at and step == args.corrupt_at and me == 0:
            d = rt.config.snapshot_dir
            newest = snapshot_path(d, 0, list_versions(d, 0)[-1])
            os.truncate(newest, os.path.getsize(newest) // 2)
        if step == args.raise_at and me == args.raise_worker:
            raise ValueError(f"a bug in the training script at step {step}")
        if args.usr1_at and step == args.usr1_at and me == 0:
            os.kill(os.getpid(), signal.SIGUSR1)
        torch.manual_seed(step_seed(0, step, me))
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        computed += 1
        time.sleep(args.step_sleep)
        if args.synchronize:
            opt.synchronize()
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()


state = ftmpi.TrainingState(opt, batches)
first_step = batches.step  # > 0 when the run resumed from a snapshot
train(state)
stats = opt.server_stats()  # stateless: waits for every shard to be rebuilt (and pulled)
h = hashlib.sha256()
by_param = {}
for name, t in sorted(model.state_dict().items()):
    h.update(t.detach().numpy().tobytes())
    by_param[name] = hashlib.sha256(t.detach().numpy().tobytes()).hexdigest()[:12]
print(
    json.dumps(
        {
            "worker": me,
            "workers": ftmpi.size(),
            "weights": h.hexdigest(),
            "weights_by_param": by_param,  # tells which shard differs when workers disagree
            "rollbacks": state.rollbacks,
            "computed": computed,
            "position": opt.position,
            "first_step": first_step,
            "applied": [s["applied"] for s in stats],
            "versions": [s["version"] for s in stats],
            "replayed": [s["replayed"] for s in stats],
            "stale": opt.stale_stats(),
        }
    ),
    flush=True,
)
