"""The seed paper's trainer: its CNN on digits / MNIST-style IDX / synthetic data, under ftmpi.

Run on every rank of one MPI job, e.g. one server and two workers::

    ftmpi-run -np 2 --servers 1 -- python examples/paper_trainer.py --steps 300

Worker 0 evaluates on the held-out split every ``--eval-every`` steps, writes
``metrics.csv``/``metrics.jsonl`` to the run directory, adds the data and its arguments to the
``manifest.json`` that ``ftmpi.init()`` wrote, hands its results to ``ftmpi.record`` (ftmpi
writes them into ``summary.json`` and the manifest's outcome at exit) and prints a results table
at the end. It also writes ``steps.csv``: the wall-clock (``time.time()``)
start and end of each of its training steps, redone steps after a rollback included, which is
what ``ftmpi-run experiment`` derives idle time and lost updates from.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import ftmpi
from ftmpi import record
from ftmpi.datasets import load_dataset
from ftmpi.manifest import weights_sha256, write_manifest
from ftmpi.metrics import MetricsWriter
from ftmpi.models import PaperCNN
from ftmpi.sampler import ShardedBatches

OUTCOME = ("weights_sha256", "final_test_accuracy", "final_loss", "steps", "wall_seconds")
"""Summary fields also recorded as the manifest's outcome."""

OPTIMIZERS = {
    "sgd": lambda ps, a: torch.optim.SGD(ps, lr=a.lr, momentum=a.momentum),
    "adam": lambda ps, a: torch.optim.Adam(ps, lr=a.lr),
    "adamw": lambda ps, a: torch.optim.AdamW(ps, lr=a.lr),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        default="digits",
        help="digits (default, bundled with scikit-learn), idx:DIR, synthetic[:N]",
    )
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds of training instead (0: use --steps)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="per-worker batch (paper: 32)")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (paper: 0.01)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (paper: 0)")
    p.add_argument("--eval-every", type=int, default=25, help="evaluate every N steps")
    p.add_argument(
        "--start-at",
        type=float,
        default=0.0,
        metavar="EPOCH",
        help="wait until this wall-clock time (time.time()) before training (0: at once)",
    )
    p.add_argument("--seed", type=int, default=None, help="default: FTMPI_SEED or 0")
    p.add_argument("--run-dir", default=None, help="default: FTMPI_RUN_DIR or runs/<run id>")
    p.add_argument(
        "--warmup-steps", type=int, default=5, help="steps excluded from the throughput figure"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "eval_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.lr <= 0:
        p.error(f"--lr must be positive, got {a.lr}")
    return a


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on the whole split, dropout off."""
    model.eval()
    logits = torch.cat([model(x[i : i + 1024]) for i in range(0, len(x), 1024)])
    model.train()
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.run_dir:
        os.environ["FTMPI_RUN_DIR"] = args.run_dir  # snapshots and events go there too
    rt = ftmpi.init()  # server ranks serve here and exit
    seed = rt.config.seed if args.seed is None else args.seed
    me, workers = ftmpi.rank(), ftmpi.size()
    data = load_dataset(args.data, seed=seed)

    torch.manual_seed(seed)  # same initial weights on every worker
    model = PaperCNN(num_classes=data.num_classes)
    opt = ftmpi.DistributedOptimizer(
        OPTIMIZERS[args.optimizer](model.parameters(), args),
        named_parameters=model.named_parameters(),
    )
    batches = ShardedBatches(
        data.train_x, data.train_y, args.batch_size, worker=me, workers=workers, seed=seed
    )

    lead = me == 0
    metrics = None
    run_dir = args.run_dir or rt.config.run_dir or os.path.join("runs", rt.run_id)
    write_manifest(  # adds to the manifest ftmpi.init() wrote (worker 0)
        rt,
        run_dir,
        data={
            "spec": args.data,
            "name": data.name,
            "sha256": data.content_hash(),
            "train": len(data.train_y),
            "test": len(data.test_y),
        },
        extra={"trainer": vars(args)},
    )
    if lead:
        metrics = MetricsWriter(run_dir)

    bar = tqdm(
        total=None if args.duration else args.steps,
        disable=not lead or args.no_progress,
        mininterval=1.0,
        desc=f"{rt.config.mode}/{rt.num_servers} server(s)",
        file=sys.stderr,
    )
    time.sleep(max(0.0, args.start_at - time.time()))  # every worker starts at that moment
    start = time.monotonic()
    metrics_origin = time.time() - (start - metrics.start) if metrics else time.time()
    clock = {"train_seconds": 0.0, "timed_steps": 0, "loss": float("nan")}
    step_log: list[tuple[int, float, float]] = []  # (step, start, end), wall clock

    @ftmpi.run  # a server failure under the checkpoint strategy rewinds state.batches
    def train(state: ftmpi.TrainingState) -> None:
        while not _done(args, state.batches.step, start, rt):
            step, x, y = next(state.batches)
            t0, wall0 = time.perf_counter(), time.time()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            step_log.append((step, wall0, time.time()))
            if step >= args.warmup_steps:
                clock["train_seconds"] += time.perf_counter() - t0
                clock["timed_steps"] += 1
            clock["loss"] = loss.item()
            bar.update(1)
            if lead and (step + 1) % args.eval_every == 0:
                _record(
                    metrics,
                    opt,
                    model,
                    data,
                    step + 1,
                    state.batches.epoch,
                    clock["loss"],
                    rt,
                    len(step_log) * workers,
                )

    train(ftmpi.TrainingState(opt, batches))  # reseeds the RNGs at every step (ftmpi.repro)
    train_seconds, timed_steps, loss_value = (
        clock["train_seconds"],
        clock["timed_steps"],
        clock["loss"],
    )
    steps_done = batches.step
    bar.close()
    asynchronous = rt.config.mode == "async" and workers > 1
    if asynchronous and rt.backend is not None:
        rt.backend.barrier()  # every worker's last push is applied before the final counters
    if not lead:
        return None
    assert metrics is not None
    if metrics.records and metrics.records[-1]["step"] == steps_done:
        final = metrics.records[-1]
        if asynchronous:  # that evaluation may predate the other workers' last pushes
            stats = opt.server_stats()
            final = {
                **final,
                "applied": [s["applied"] for s in stats],
                "versions": [s["version"] for s in stats],
            }
    else:
        final = _record(
            metrics,
            opt,
            model,
            data,
            steps_done,
            batches.epoch,
            loss_value,
            rt,
            len(step_log) * workers,
        )
    write_step_log(os.path.join(run_dir, "steps.csv"), step_log)
    summary = {
        "run_id": rt.run_id,
        "mode": rt.config.mode,
        "servers": rt.num_servers,
        "workers": workers,
        "backend": rt.backend.name if rt.backend else "none",
        "steps": steps_done,
        "wall_seconds": round(time.monotonic() - start, 3),
        "steps_per_second": timed_steps / train_seconds if train_seconds else None,
        "final_test_accuracy": final["test_accuracy"],
        "final_loss": final["loss"],
        "applied": final.get("applied"),
        "versions": final.get("versions"),
        "gradients_computed": final.get("computed"),
        "stale": opt.stale_stats(),
        "job_start": rt.job_start,
        "metrics_origin": metrics_origin,
        "weights_sha256": weights_sha256(model),
        "step_times_ms": opt.step_times(),
    }
    record.add_summary(**summary)  # ftmpi writes summary.json with them at exit
    record.add_outcome(
        **{k: summary[k] for k in OUTCOME},
        best_test_accuracy=max(r["test_accuracy"] for r in metrics.records),
    )
    metrics.close()
    print_table(metrics.records, summary)
    return summary


def _done(args: argparse.Namespace, step: int, start: float, rt: ftmpi.Runtime) -> bool:
    """Whether to stop before ``step``. With ``--duration`` in sync mode, worker 0's clock
    decides at every evaluation boundary and the decision is broadcast, so all workers stop at
    the same step."""
    if not args.duration:
        return step >= args.steps
    if rt.config.mode == "async":
        return time.monotonic() - start >= args.duration
    if step % args.eval_every:
        return False
    flag = torch.tensor([float(time.monotonic() - start >= args.duration)])
    assert rt.backend is not None
    rt.backend.broadcast_(flag, root=0)
    return bool(flag.item())


def _record(
    metrics: MetricsWriter | None,
    opt: Any,
    model: torch.nn.Module,
    data: Any,
    step: int,
    epoch: int,
    train_loss: float,
    rt: ftmpi.Runtime,
    computed: int,
) -> dict[str, Any]:
    """Evaluate and record one metrics row. ``computed`` is the gradients the workers have
    computed so far, redone and logged ones included (this worker's steps times the worker
    count: exact in sync mode and with one worker). While a server is down (a stateless worker
    keeps training) the servers are not asked, which would wait for the replacement: the model
    evaluated is this worker's copy and the server counters are the last ones seen."""
    assert metrics is not None
    down = bool(rt.down_since)
    if rt.config.mode == "async" and not down:
        opt.pull()  # evaluate the servers' current model, not this worker's possibly stale copy
    test_loss, acc = evaluate(model, data.test_x, data.test_y)
    if down and metrics.records:
        last = metrics.records[-1]
        keys = ("applied", "versions", "replayed", "staleness_mean", "staleness_max")
        return metrics.record(
            step=step,
            epoch=epoch,
            loss=round(test_loss, 5),
            train_loss=round(train_loss, 5),
            test_accuracy=round(acc, 5),
            computed=computed,
            **{k: last.get(k) for k in keys},
        )
    stats = opt.server_stats(wait=False)  # a server dying meanwhile must not stop training
    return metrics.record(
        step=step,
        epoch=epoch,
        loss=round(test_loss, 5),
        train_loss=round(train_loss, 5),
        test_accuracy=round(acc, 5),
        applied=[s["applied"] for s in stats],
        versions=[s["version"] for s in stats],
        replayed=sum(s["replayed"] for s in stats),
        computed=computed,
        staleness_mean=round(max((s["staleness_mean"] for s in stats), default=0.0), 3),
        staleness_max=max((s["staleness_max"] for s in stats), default=0),
    )


def write_step_log(path: str, steps: list[tuple[int, float, float]]) -> None:
    """``steps.csv``: one row per training step this worker ran (``step,start,end``)."""
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(("step", "start", "end"))
        out.writerows((n, f"{a:.6f}", f"{b:.6f}") for n, a, b in steps)


def print_table(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The results table printed at the end of a run."""
    shown = records if len(records) <= 12 else records[:: max(1, len(records) // 10)] + records[-1:]
    print(
        f"\n{'time s':>8} {'step':>6} {'test loss':>10} {'accuracy':>9} {'applied':>12} "
        f"{'stale max':>9}"
    )
    for r in shown:
        applied = "/".join(str(a) for a in r.get("applied") or []) or "-"
        print(
            f"{r['wall_time']:>8.1f} {r['step']:>6} {r['loss']:>10.4f} "
            f"{r['test_accuracy']:>9.4f} {applied:>12} {r['staleness_max']:>9}"
        )
    sps = summary["steps_per_second"]
    print(
        f"\nrun {summary['run_id']}: {summary['mode']} mode, {summary['workers']} worker(s), "
        f"{summary['servers']} server(s), backend {summary['backend']}; "
        f"{summary['steps']} steps in {summary['wall_seconds']:.1f} s"
        + (f" ({sps:.1f} steps/s)" if sps else "")
        + f"; final test accuracy {summary['final_test_accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
