"""Horovod through failures: steady-state steps/s after a recovery, relative to before it.

Each job runs ``ftmpi-run -np 2`` on the Horovod backend (strategy ``chain``, two server ranks
holding one shard) and trains a :class:`~ftmpi.models.SyntheticMLP` of ``--params`` parameters
on random data for ``--steps`` steps; worker 0 records when each step ended. One rank is
SIGKILLed at step ``--kill-at``:

- ``server death``: the chain head (``server:0``). The workers' communicator does not change,
  so Horovod carries on as it was; the replacement server joins the tail after ``--down-for``.
- ``worker death``: worker 1, with ``FTMPI_RESPAWN_WORKERS=1``. The survivor restarts Horovod on
  its own, and again with the replacement once it joins after ``--down-for``: the job is back
  to two workers on Horovod.

**before** is the median step time over the ``--window`` steps before the kill (after
``--warmup``); **after** the median over the ``--window`` steps starting ``--settle`` steps after
the last recovery event (``step_resumed``, ``worker_joined``, ``replacement_ready``,
``backend_restarted``), so the replacement is in. **ratio** = before / after = steps/s after /
steps/s before (1.0: no lasting cost). The run record's ``backend`` and ``backend_fallback``
are printed too. Medians absorb single slow steps; on a small shared machine a ratio still moves
by a few percent between invocations (``--repeats`` runs each job again, the table gives the
median ratio).

    python benchmarks/bench_horovod_recovery.py [--params 1000000 25000000] [--repeats 1]

The rank program is this file with ``--rank`` (what ``ftmpi-run`` starts on every rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftmpi.events import read_events  # noqa: E402

IN_FEATURES = 784
CLASSES = 10
RECOVERY_EVENTS = ("step_resumed", "worker_joined", "replacement_ready", "backend_restarted")

KINDS: dict[str, dict[str, str]] = {
    "server death": {"FTMPI_KILL": "server:0@step={k}"},
    "worker death": {"FTMPI_KILL": "worker:1@step={k}", "FTMPI_RESPAWN_WORKERS": "1"},
}


def rank_main(params: int, steps: int, batch: int, out: str) -> None:
    """On every rank: train ``steps`` steps; worker 0 writes ``[[position, time], ...]``."""
    import torch
    import torch.nn.functional as F

    import ftmpi
    from ftmpi.models import SyntheticMLP

    rt = ftmpi.init()  # servers serve and exit here
    torch.manual_seed(0)
    model = SyntheticMLP(params, IN_FEATURES, CLASSES)
    opt = ftmpi.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
        named_parameters=model.named_parameters(),
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, IN_FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (batch,), generator=gen)
    original = not rt.late_joiner and ftmpi.rank() == 0
    ends: list[list[float]] = []
    while opt.position < steps:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        ends.append([opt.position, time.time()])
    if original:
        Path(out).write_text(
            json.dumps({"ends": ends, "backend": rt.backend.name if rt.backend else "none"})
        )


def run_job(kind: str, params: int, args: argparse.Namespace) -> dict[str, Any]:
    """One job with one kill; returns its steps/s before and after, and its run record."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FTMPI_")},
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FTMPI_BACKEND": args.backend,
            "FTMPI_STRATEGY": "chain",
            "FTMPI_CHAIN_LENGTH": "2",
            "FTMPI_SERVERS": "2",
            "FTMPI_DOWN_FOR": str(args.down_for),
            "FTMPI_RUN_DIR": tmp,
            **{k: v.format(k=args.kill_at) for k, v in KINDS[kind].items()},
        }
        out = Path(tmp) / "steps.json"
        cmd = [
            *(sys.executable, "-m", "launch.cli", "-np", "2", "--"),
            *(sys.executable, str(Path(__file__).resolve()), "--rank"),
            *("--params", str(params), "--steps", str(args.steps), "--out", str(out)),
            *("--batch-size", str(args.batch_size)),
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT, env=env, check=False
        )
        if not out.exists() or not (Path(tmp) / "summary.json").exists():
            raise RuntimeError(f"{kind}: no result (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        doc = json.loads(out.read_text())
        summary = json.loads((Path(tmp) / "summary.json").read_text())
        events = read_events(tmp)
    ends = doc["ends"]
    kill = next(e["time"] for e in events if e["event"] == "kill")
    recovered = max(e["time"] for e in events if e["event"] in RECOVERY_EVENTS)
    # (position, seconds since the previous step ended, time it ended)
    steps = [(p, t - t0, t) for (p, t), (_, t0) in zip(ends[1:], ends[:-1], strict=True)]
    before = [d for p, d, t in steps if args.warmup < p and t < kill][-args.window :]
    after = [d for _, d, t in steps if t > recovered][args.settle : args.settle + args.window]
    if len(before) < args.window // 2 or len(after) < args.window // 2:
        raise RuntimeError(
            f"{kind}, {params}: windows too short ({len(before)} before, {len(after)} after); "
            "use more --steps or another --kill-at"
        )
    b, a = statistics.median(before), statistics.median(after)
    return {
        "steps_per_s_before": 1 / b,
        "steps_per_s_after": 1 / a,
        "ratio": b / a,
        "backend": summary["backend"],
        "backend_fallback": summary["backend_fallback"],
        "restarts": sum(e["event"] == "backend_restarted" for e in events),
        "window": [len(before), len(after)],
    }


def _median(runs: list[dict[str, Any]], key: str, digits: int) -> float:
    return round(float(statistics.median(r[key] for r in runs)), digits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, nargs="+", default=[1_000_000, 25_000_000])
    p.add_argument("--steps", type=int, default=0, help="default: 600 at 1M, 160 at 25M")
    p.add_argument("--kill-at", type=int, default=0, help="default: a third of --steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--window", type=int, default=0, help="default: a fifth of --steps")
    p.add_argument("--settle", type=int, default=10)
    p.add_argument("--down-for", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--backend", default="horovod", help="mpi: the same jobs as a control")
    args = p.parse_args()
    if args.rank:
        rank_main(args.params[0], args.steps, args.batch_size, args.out)
        return
    rows = []
    for params in args.params:
        sized = argparse.Namespace(**vars(args))
        sized.steps = args.steps or (600 if params <= 5_000_000 else 160)
        sized.kill_at = args.kill_at or sized.steps // 3
        sized.window = args.window or sized.steps // 5
        for kind in KINDS:
            runs = [run_job(kind, params, sized) for _ in range(args.repeats)]
            fallbacks = [r["backend_fallback"] for r in runs if r["backend_fallback"]]
            row = {
                "params": params,
                "failure": kind,
                "steps_per_s_before": _median(runs, "steps_per_s_before", 2),
                "steps_per_s_after": _median(runs, "steps_per_s_after", 2),
                "ratio": _median(runs, "ratio", 3),
                "ratios": [round(r["ratio"], 3) for r in runs],
                "backend": "/".join(sorted({r["backend"] for r in runs})),
                "backend_fallback": fallbacks[0] if fallbacks else None,
                "horovod_restarts": runs[0]["restarts"],
                "windows": runs[0]["window"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["params", "failure", "steps_per_s_before", "steps_per_s_after", "ratio", "ratios"]
    cols += ["backend", "backend_fallback", "horovod_restarts"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
