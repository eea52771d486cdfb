"""Plain Horovod vs. ftmpi with the Horovod backend and one server: steps/s in one run.

(a) ``examples/horovod_digits.py`` (hvd.DistributedOptimizer, 2 workers), (b) the same script
with the ftmpi import (2 workers + 1 server), on the paper's CNN and a ~25M-parameter MLP. Both
are launched with the same mpirun flags; repeats are interleaved; median steps/s and the ratio
(b)/(a) are printed as a Markdown table.

    python benchmarks/bench_horovod.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MPIRUN = str(Path(sys.executable).parent / "mpirun")


def run_once(script: str, servers: int, model: str, steps: int) -> float:
    cmd = [MPIRUN, "--with-ft", "ulfm", "--oversubscribe", "-np", str(2 + servers)]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    cmd += [
        "-x",
        f"FTMPI_SERVERS={servers}",
        sys.executable,
        str(ROOT / "examples" / script),
        "--model",
        model,
        "--steps",
        str(steps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FTMPI_SERVERS": str(servers)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, env=env)
    line = next(x for x in out.stdout.splitlines() if x.startswith("{"))
    return json.loads(line)["steps_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["cnn", "mlp25m"])
    a = p.parse_args()
    print("| model | plain Horovod steps/s | ftmpi (Horovod backend, 1 server) steps/s | ratio |")
    print("|---|---|---|---|")
    for model in a.models:
        plain, ours = [], []
        for _ in range(a.repeats):
            plain.append(run_once("horovod_digits.py", 0, model, a.steps))
            ours.append(run_once("horovod_digits_ftmpi.py", 1, model, a.steps))
        pm, om = statistics.median(plain), statistics.median(ours)
        print(f"| {model} | {pm:.2f} | {om:.2f} | {om / pm:.3f} |", flush=True)


if __name__ == "__main__":
    main()
