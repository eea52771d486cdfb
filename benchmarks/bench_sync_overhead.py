"""Sync data path vs. plain data parallelism: training steps/s of the paper's CNN, in one run.

Runs ``examples/paper_trainer.py`` alternately with no servers (baseline: MPI-backend allreduce
and a local optimizer step on every worker) and with 1 (and 2) servers, same workers, same data,
same seed; repeats interleaved so machine noise hits both; reports the median steps/s and the
ratio to the baseline. Oversubscribed when ranks exceed cores (it says so).

    python benchmarks/bench_sync_overhead.py [--workers 2] [--steps 400] [--repeats 3]
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

ROOT = Path(__file__).resolve().parents[1]


def run_once(workers: int, servers: int, steps: int, batch: int, mode: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "launch.cli",
            "-np",
            str(workers),
            "--servers",
            str(servers),
            "--mode",
            mode,
            "--run-dir",
            tmp,
            "--",
            sys.executable,
            str(ROOT / "examples" / "paper_trainer.py"),
            "--steps",
            str(steps),
            "--batch-size",
            str(batch),
            "--eval-every",
            str(10 * steps),
            "--no-progress",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env["FTMPI_BACKEND"] = "mpi"  # the baseline is the MPI backend
        subprocess.run(
            cmd, check=True, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
        )
        return json.loads((Path(tmp) / "summary.json").read_text())["steps_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--servers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write results here")
    a = p.parse_args()
    configs = [(0, "sync"), *[(s, "sync") for s in a.servers]]
    samples: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
    for r in range(a.repeats):
        for c in configs:
            sps = run_once(a.workers, c[0], a.steps, a.batch_size, c[1])
            samples[c].append(sps)
            print(f"repeat {r + 1}/{a.repeats}: servers={c[0]} {sps:.1f} steps/s", flush=True)
    base = statistics.median(samples[(0, "sync")])
    cores = os.cpu_count() or 1
    print(
        f"\nPaper CNN (813,258 parameters), batch {a.batch_size}/worker, {a.workers} workers, "
        f"{a.steps} steps, median of {a.repeats}; {cores} cores"
        + (" (oversubscribed)" if a.workers + max(a.servers) > cores else "")
    )
    print("\n| configuration | steps/s | ratio to no-server baseline |")
    print("|---|---|---|")
    rows = []
    for c in configs:
        med = statistics.median(samples[c])
        name = "no servers (MPI allreduce + local step)" if c[0] == 0 else f"{c[0]} server(s), sync"
        print(f"| {name} | {med:.1f} | {med / base:.3f} |")
        rows.append(
            {
                "servers": c[0],
                "mode": c[1],
                "steps_per_second": med,
                "samples": samples[c],
                "ratio": med / base,
            }
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
