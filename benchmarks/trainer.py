"""The benchmark workload, run on every rank of one job: a :class:`~ftmpi.models.SyntheticMLP`
of a requested size trained on random data, on ftmpi or on plain Horovod.

    ftmpi-run -np 2 --servers 2 -- python benchmarks/trainer.py --params 1000000 25000000
    ftmpi-run -np 2 --servers 0 -- python benchmarks/trainer.py --params 25000000 --plain-horovod

The models are trained one after the other in the same job (a fresh model, optimizer and, on
ftmpi, server state for each: the servers are re-initialised), which saves a job start per
size. Every worker times the forward pass, the backward pass and ``optimizer.step()`` of each step
after ``--warmup`` steps (the phases of ``step()`` come from ``optimizer.step_times()``) and
prints one line ``BENCH {json}`` per model with its timings and its peak RSS so far (a high-water
mark: list sizes in increasing order); worker 0 adds every server's ``STATS`` (peak RSS, and the
updates applied and apply seconds of this model). ``--plain-horovod`` uses ``horovod.torch``
directly (``hvd.DistributedOptimizer``), with the same model, data and optimizer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from ftmpi.models import SyntheticMLP, count_parameters
from ftmpi.resources import peak_rss_bytes

IN_FEATURES = 784
CLASSES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--params", type=int, nargs="+", default=[1_000_000], help="parameter-count targets"
    )
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the timings")
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step")
    p.add_argument("--plain-horovod", action="store_true", help="horovod.torch, no ftmpi")
    p.add_argument("--device", default="cpu", help="where the model trains (e.g. cuda)")
    return p.parse_args(argv)


def build_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 or Adam, learning rate 0.01."""
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


class StepClock:
    """Seconds spent in forward, backward and ``optimizer.step()`` after the warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.seconds = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        self.steps = 0
        self.wall = 0.0
        self.durations: list[float] = []

    def train_step(
        self,
        step: int,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        sleep: float,
    ) -> None:
        """Run and time one step."""
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if sleep:
            time.sleep(sleep)
        t3 = time.perf_counter()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()  # the step's kernels are done before the clock stops
        t4 = time.perf_counter()
        if step >= self.warmup:
            self.seconds["forward"] += t1 - t0
            self.seconds["backward"] += t2 - t1
            self.seconds["step"] += t4 - t3
            self.wall += t4 - t0
            self.steps += 1
            self.durations.append(t4 - t0)

    def report(self, batch: int, workers: int) -> dict[str, Any]:
        """Mean milliseconds per phase and per step, steps/s and samples/s (all workers)."""
        n = max(self.steps, 1)
        sps = self.steps / self.wall if self.wall else 0.0
        return {
            "timed_steps": self.steps,
            "ms": {k: round(1000 * v / n, 3) for k, v in self.seconds.items()},
            "step_ms": round(1000 * self.wall / n, 3),
            "median_step_ms": round(1000 * statistics.median(self.durations or [0.0]), 3),
            "steps_per_second": round(sps, 4),
            "samples_per_second": round(sps * batch * workers, 2),
        }


def synthetic_data(batch: int, batches: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``batches * batch`` random inputs and labels (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch, IN_FEATURES, generator=gen)
    return x, torch.randint(0, CLASSES, (batches * batch,), generator=gen)


def run_plain_horovod(args: argparse.Namespace) -> None:
    """The baseline: ``hvd.DistributedOptimizer`` on every rank."""
    import horovod.torch as hvd

    hvd.init()
    for params in args.params:
        plain_horovod_model(hvd, args, params)
    hvd.shutdown()


def plain_horovod_model(hvd: Any, args: argparse.Namespace, params: int) -> None:
    """Train one model with Horovod and print its ``BENCH`` line."""
    torch.manual_seed(0)
    model = SyntheticMLP(params, IN_FEATURES, CLASSES)
    opt = hvd.DistributedOptimizer(
        build_optimizer(args.optimizer, model.parameters()),
        named_parameters=model.named_parameters(),
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    x, y = synthetic_data(args.batch_size)
    clock = StepClock(args.warmup)
    nb = len(y) // args.batch_size
    for step in range(args.steps):
        i = (step * hvd.size() + hvd.rank()) % nb * args.batch_size
        xb, yb = x[i : i + args.batch_size], y[i : i + args.batch_size]
        clock.train_step(step, model, opt, xb, yb, args.step_sleep)
    out = {
        "worker": hvd.rank(),
        "workers": hvd.size(),
        "params": count_parameters(model),
        "backend": "plain horovod",
        "peak_rss": peak_rss_bytes(),
        **clock.report(args.batch_size, hvd.size()),
    }
    print("BENCH " + json.dumps(out), flush=True)


def run_ftmpi(args: argparse.Namespace) -> None:
    """ftmpi on workers and servers (server ranks serve inside ``ftmpi.init()``)."""
    import ftmpi

    ftmpi.init()
    before: list[dict[str, Any]] = []
    for params in args.params:
        before = ftmpi_model(args, params, before)


def ftmpi_model(
    args: argparse.Namespace, params: int, before: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Train one model on ftmpi and print its ``BENCH`` line; ``before`` is the server stats
    after the previous model (counters are cumulative). Returns this model's (worker 0)."""
    import ftmpi
    from ftmpi.sampler import ShardedBatches

    rt = ftmpi.runtime()
    me, workers = ftmpi.rank(), ftmpi.size()
    torch.manual_seed(0)
    model = SyntheticMLP(params, IN_FEATURES, CLASSES).to(args.device)
    opt = ftmpi.DistributedOptimizer(
        build_optimizer(args.optimizer, model.parameters()),
        named_parameters=model.named_parameters(),
    )
    x, y = (t.to(args.device) for t in synthetic_data(args.batch_size * workers))
    batches = ShardedBatches(x, y, args.batch_size, worker=me, workers=workers, seed=0)
    clock = StepClock(args.warmup)
    warm: dict[str, float] = {}

    @ftmpi.run
    def train(state: ftmpi.TrainingState) -> None:
        for step, xb, yb in state.batches:
            if step >= args.steps:
                return
            if step == args.warmup:
                warm.update(opt.step_times())
            clock.train_step(step, model, opt, xb, yb, args.step_sleep)

    train(ftmpi.TrainingState(opt, batches, reseed=False))
    out: dict[str, Any] = {
        "worker": me,
        "workers": workers,
        "params": count_parameters(model),
        "backend": rt.backend.name if rt.backend else "none",
        "servers": rt.num_servers,
        "strategy": rt.config.strategy,
        **clock.report(args.batch_size, workers),
        "phases_ms": _after_warmup(opt.step_times(), warm, args.steps, args.warmup),
        "stale": opt.stale_stats(),
    }
    stats = opt.server_stats() if me == 0 else []
    if me == 0:
        out["server_stats"] = [_delta(s, before) for s in stats]
    out["peak_rss"] = peak_rss_bytes()  # after server_stats: a stateless log is replayed by then
    print("BENCH " + json.dumps(out), flush=True)
    return stats


def _after_warmup(
    end: dict[str, float], warm: dict[str, float], steps: int, warmup: int
) -> dict[str, float]:
    """Per-step phase means over the timed steps, from the means after ``warmup`` steps
    (``warm``) and after ``steps`` (``end``)."""
    n = max(steps - warmup, 1)
    return {k: round((v * steps - warm.get(k, 0.0) * warmup) / n, 3) for k, v in end.items()}


def _delta(stats: dict[str, Any], before: list[dict[str, Any]]) -> dict[str, Any]:
    """``stats`` with ``applied``/``apply_seconds`` counted from ``before`` (same server)."""
    prev = next((b for b in before if b["server"] == stats["server"]), None)
    if prev is None:
        return stats
    return {
        **stats,
        "applied": stats["applied"] - prev["applied"],
        "apply_seconds": stats["apply_seconds"] - prev["apply_seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.plain_horovod:
        run_plain_horovod(args)
    else:
        run_ftmpi(args)


if __name__ == "__main__":
    main()
