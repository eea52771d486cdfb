"""Recovery strategies, in one run: steady-state cost and what one server kill costs.

For each strategy, ``examples/paper_trainer.py`` (the paper's CNN, 813,258 parameters, one shard)
runs through ``ftmpi-run`` twice with 2 workers:

- without failures, to get steady-state steps/s, reported as a ratio to the same job with
  strategy ``none`` measured in the same invocation (runs interleaved over ``--repeats`` so
  machine noise hits all alike; medians reported);
- with ``server:0`` (the chain head; replacements come 2 s after a death, except for
  ``checkpoint``, whose workers wait for it anyway) SIGKILLed at step ``--kill-at``, to get
  from the run's event log: **failover** (the kill to the first update applied after it: the
  first completed step for strategies whose steps reach a server, the replay of the gradient
  log for ``stateless``), **idle** (seconds workers spent inside recoveries, summed over worker
  0's ``step_resumed`` events), and **updates lost** (steps a rollback rewound, or steps whose
  update never reached the final weights: steps minus the shard's final version).

Chains run 3 server ranks per shard: with 2 workers that is 5 ranks on this machine's 2 cores
(oversubscribed; the table says how many ranks each row ran and whether they outnumber the
cores: there a ratio measures the sharing of cores as much as the strategy, and on the 2-core
development machine the chain's varies by more than 0.1 between invocations). The control
``none, 3 servers`` runs 5 ranks without replication (three shards, one server each), so a
chain's ratio can be read against the cost of the rank count alone.

    python benchmarks/bench_strategies.py [--steps 600] [--kill-at 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftmpi.events import read_events  # noqa: E402

CORES = os.cpu_count() or 1


def oversubscribed(ranks: int) -> str:
    """``"yes (N ranks / C cores)"`` or ``"no"``: whether a job's ranks outnumber the cores,
    so that its ratios measure the sharing of cores as much as the strategy."""
    return f"yes ({ranks}/{CORES})" if ranks > CORES else "no"


STRATEGIES: dict[str, dict[str, str]] = {
    "none": {"FTMPI_STRATEGY": "none"},
    # a control with a chain's rank count and no replication: how much of a chain's cost here
    # is 5 processes sharing 2 cores
    "none, 3 servers": {"FTMPI_STRATEGY": "none", "FTMPI_SERVERS": "3"},
    "checkpoint (sync writes)": {"FTMPI_STRATEGY": "checkpoint"},
    "checkpoint (async writes)": {"FTMPI_STRATEGY": "checkpoint", "FTMPI_ASYNC_CHECKPOINT": "1"},
    "chain tail ack": {"FTMPI_STRATEGY": "chain", "FTMPI_SERVERS": "3", "FTMPI_DOWN_FOR": "2"},
    "chain next ack, every 100": {
        "FTMPI_STRATEGY": "chain",
        "FTMPI_SERVERS": "3",
        "FTMPI_DOWN_FOR": "2",
        "FTMPI_CHAIN_ACK": "next",
        "FTMPI_REPLICATE_EVERY": "100",
    },
    "stateless": {"FTMPI_STRATEGY": "stateless", "FTMPI_DOWN_FOR": "2"},
    "chain+stateless": {
        "FTMPI_STRATEGY": "chain+stateless",
        "FTMPI_SERVERS": "3",
        "FTMPI_DOWN_FOR": "2",
    },
}


def run(env: dict[str, str], steps: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One job; returns its summary.json and event log."""
    with tempfile.TemporaryDirectory() as tmp:
        full = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FTMPI_")},
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "FTMPI_BACKEND": "mpi",
            "FTMPI_SERVERS": "1",
            "FTMPI_CHECKPOINT_EVERY": "100",
            "FTMPI_RUN_DIR": tmp,
            **env,
        }
        cmd = [
            sys.executable,
            "-m",
            "launch.cli",
            "-np",
            "2",
            "--",
            sys.executable,
            str(ROOT / "examples" / "paper_trainer.py"),
            "--steps",
            str(steps),
            "--eval-every",
            str(10 * steps),
            "--no-progress",
            "--run-dir",
            tmp,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=full, check=False
        )
        summary_path = Path(tmp) / "summary.json"
        if not summary_path.exists():
            raise RuntimeError(f"{env}: no summary (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
        return json.loads(summary_path.read_text()), read_events(tmp)


def kill_costs(events: list[dict[str, Any]], summary: dict[str, Any], stateless: bool) -> dict:
    """Failover seconds, idle seconds and updates lost of a run with one kill."""
    kill = next(e for e in events if e["event"] == "kill")
    after = [e for e in events if e["time"] >= kill["time"]]
    applied_kind = "log_replayed" if stateless else "step_resumed"
    first = next((e for e in after if e["event"] == applied_kind), None)
    resumed = [e for e in events if e["event"] == "step_resumed" and e.get("role") == "worker 0"]
    rollbacks = [e for e in events if e["event"] == "rollback" and e.get("role") == "worker 0"]
    if rollbacks:
        lost = sum(int(kill["spec"].split("=")[-1]) - e["position"] for e in rollbacks)
    else:
        lost = summary["steps"] - max(summary["versions"] or [summary["steps"]])
    return {
        "failover_s": round(first["time"] - kill["time"], 3) if first else None,
        "idle_s": round(sum(e["idle_s"] for e in resumed), 3),
        "updates_lost": lost,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--kill-at", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="strategy names (default: all)")
    args = p.parse_args()
    names = [n for n in STRATEGIES if args.only is None or n in args.only or n == "none"]
    sps: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        for n in names:
            summary, _ = run(STRATEGIES[n], args.steps)
            sps[n].append(summary["steps_per_second"])
            print(f"repeat {r + 1}: {n}: {sps[n][-1]:.1f} steps/s", file=sys.stderr, flush=True)
    base = statistics.median(sps["none"])
    rows = []
    for n in names:
        env = STRATEGIES[n]
        ranks = 2 + int(env.get("FTMPI_SERVERS", "1"))
        row: dict[str, Any] = {
            "strategy": n,
            "ranks": ranks,
            "oversubscribed": oversubscribed(ranks),
            "steps_per_s": round(statistics.median(sps[n]), 2),
            "ratio": round(statistics.median(sps[n]) / base, 3),
        }
        if not n.startswith("none"):
            summary, events = run(
                {**env, "FTMPI_KILL": f"server:0@step={args.kill_at}"}, args.steps
            )
            row.update(kill_costs(events, summary, stateless=n == "stateless"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["strategy", "ranks", "oversubscribed", "steps_per_s", "ratio"]
    cols += ["failover_s", "idle_s", "updates_lost"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
