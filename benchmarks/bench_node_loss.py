"""Losing a whole node of a multi-node job: time to training resumed, updates redone, weights.

    sudo .venv/bin/python benchmarks/bench_node_loss.py [--steps 200] [--kill-after 8]

Builds a 5-node namespace cluster (``tests/multinode/cluster.py``, root): ``n5`` launches
(``ftmpi-run --hostfile --max-restarts 2``, as a login node would) and ``n1``-``n4`` compute,
ranks round-robin over them. Each case kills every process of one node (its daemon, ranks,
``/dev/shm`` and ``/tmp``) ``--kill-after`` seconds into training, with a tail-ack chain:

- ``servers only``: 2 workers + a chain of 3; the node holds one chain member and nothing else;
- ``workers only``: the same job; the node holds worker 1 alone;
- ``worker 0``: the same job; the node holds worker 0 and a chain member;
- ``half of a chain``: 2 workers + 2 chains of 2; the node holds one of a chain's two members.

Per case: what the node held (from the manifest), seconds from the node's death to the
relaunched workers' ``resumed`` event, the version resumed from, the newest node copy any node
held just before the kill, the victim included (the updates redone are at least the
difference), and whether the final weights are those of the same job without the failure (run
first, on the same cluster).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.proctree import kill_tree  # noqa: E402
from tests.multinode.cluster import Cluster  # noqa: E402
from tests.multinode.test_node_loss import newest_node_copy  # noqa: E402

VENV = Path(sys.executable).parent
PROG = str(ROOT / "tests" / "mpi" / "progs" / "ft_train.py")
ENV = {"FTMPI_BACKEND": "mpi", "FTMPI_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
JOBS = {
    "chain of 3": ["--servers", "3", "--chain-length", "3"],
    "2 chains of 2": ["--servers", "4", "--chain-length", "2"],
}
COMPUTE = ["n1", "n2", "n3", "n4"]
CASES = [
    ("servers only", "chain of 3", "n3"),
    ("workers only", "chain of 3", "n2"),
    ("worker 0", "chain of 3", "n1"),
    ("half of a chain", "2 chains of 2", "n3"),
]


def run(
    cluster: Cluster, name: str, job: str, steps: int, victim: str | None, after: float
) -> dict:
    run_dir = cluster.shared / name.replace(" ", "-")
    hostfile = cluster.hostfile(COMPUTE, slots=2)
    cmd = [
        str(VENV / "ftmpi-run"),
        *("-np", "2", "--strategy", "chain", "--chain-ack", "tail", *JOBS[job]),
        *("--hostfile", str(hostfile), "--max-restarts", "2", "--run-dir", str(run_dir)),
        *("--", str(VENV / "python"), PROG, str(steps), "--step-sleep", "0.05"),
    ]
    run_id = f"bench-{name.replace(' ', '-')}-{int(time.time())}"
    env = {**ENV, **cluster.mpi_env, "FTMPI_RUN_ID": run_id}
    proc = cluster.start_on("n5", cmd, env=env, cwd=ROOT)
    out: dict = {"case": name, "victim": victim}
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "manifest.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no manifest: {proc.communicate()}")
            time.sleep(0.1)
        if victim:
            manifest = json.loads((run_dir / "manifest.json").read_text())
            layout = manifest.get("layout", {}).get("ranks", [])
            out["held"] = [r.get("role") for r in layout if r.get("node") == victim]
            time.sleep(after)
            out["newest_copy"] = newest_node_copy(cluster, COMPUTE, run_id)
            cluster.kill_node(victim)
            died = time.time()
        proc.communicate(timeout=400)
    finally:
        kill_tree(proc.pid)
        if victim:
            cluster.revive(victim)
    out["exit"] = proc.returncode
    summary = json.loads((run_dir / "summary.json").read_text())
    out["weights"] = summary.get("weights_sha256")
    if victim:
        events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
        resumed = [e["time"] for e in events if e["event"] == "resumed"]
        restored = [e["version"] for e in events if e["event"] == "restored"]
        out["resumed_after_s"] = round(min(resumed) - died, 1) if resumed else None
        out["resumed_version"] = min(restored) if restored else 0
        launcher = json.loads((run_dir / "launcher.json").read_text())
        out["restarts"] = launcher["restarts"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--kill-after", type=float, default=8.0)
    args = p.parse_args()
    cluster = Cluster.create(5)  # n5 launches; it is not in the hostfile
    try:
        ref = {job: run(cluster, f"ref {job}", job, args.steps, None, 0)["weights"] for job in JOBS}
        print(
            f"{'case':18} {'node held':28} {'resumed after':>13} {'from':>5} {'newest':>6} "
            f"{'redone':>6} {'exit':>4}  weights"
        )
        for name, job, victim in CASES:
            r = run(cluster, name, job, args.steps, victim, args.kill_after)
            redone = r["newest_copy"] - r["resumed_version"]
            same = "equal" if r["weights"] == ref[job] else "DIFFERENT"
            print(
                f"{name:18} {', '.join(r['held']):28} {r['resumed_after_s']!s:>11} s "
                f"{r['resumed_version']:>5} {r['newest_copy']:>6} {redone:>6} {r['exit']:>4}  "
                f"{same} (restarts {r['restarts']})",
                flush=True,
            )
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
