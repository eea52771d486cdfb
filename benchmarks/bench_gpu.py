"""Mirror placement on a GPU: samples/s of 1 worker with 1 server (mirror, and server
placement beside it) against 1 worker without servers, the model on ``cuda``, at about 25M
(ResNet-50-sized) and 100M parameters, in one invocation (baselines interleaved).

    python benchmarks/bench_gpu.py [--steps 15] [--repeats 2]

Prints a Markdown table and one JSON line (``GPU-BENCH {...}``); ``scripts/device-check.sh``
runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.suites import Job, interleaved, vs_first
from launch.bench import markdown

SIZES = [25_000_000, 100_000_000]
CUDA = ("--device", "cuda")
JOBS = [
    Job("1 GPU worker, no servers", workers=1, trainer_args=CUDA),
    Job("1 GPU worker + 1 server, mirror", 1, 1, {"FTMPI_PLACEMENT": "mirror"}, False, CUDA),
    Job("1 GPU worker + 1 server, server placement", workers=1, servers=1, trainer_args=CUDA),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    results = interleaved(JOBS, SIZES, args.steps, args.repeats, lambda m: print(m, flush=True))
    rows = vs_first(JOBS, results, SIZES)
    print(markdown(rows))
    print("GPU-BENCH " + json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
