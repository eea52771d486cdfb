"""What ftmpi is for, in one command (``make demo``): a server dies mid-run and nothing is lost.

Trains the paper's CNN on scikit-learn's digits with 2 workers and a chain of 3 servers, kills
the chain's head (a real SIGKILL) at step 150 of 300, then trains the same run without the
failure, and shows the failure, the recovery and that both runs end with bit-for-bit the same
weights. Each run leaves its directory under ``runs/`` (``ftmpi-run summary DIR`` reads it).
Exit status 0 exactly when both runs finished and their weights are equal.

    python examples/demo.py [--steps 300] [--kill-at 150]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, steps: int, kill: list[str]) -> tuple[int, list[str], dict]:
    """One ``ftmpi-run`` job; returns its exit status, its ``ftmpi`` lines and its summary."""
    run_dir = ROOT / "runs" / f"demo-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "launch.cli", "-np", "2", "--servers", "3"]
    cmd += ["--strategy", "chain", *kill, "--run-dir", str(run_dir), "--"]
    cmd += [sys.executable, str(ROOT / "examples" / "paper_trainer.py"), "--steps", str(steps)]
    cmd += ["--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    said = [
        line
        for line in (proc.stderr + proc.stdout).splitlines()
        if line.startswith("ftmpi: ") and "continuing on the MPI backend" not in line
    ]
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc.returncode, said, {**summary, "run_dir": str(run_dir)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--kill-at", type=int, default=150)
    args = p.parse_args()
    print(
        f"ftmpi demo: 2 workers and a chain of 3 servers train for {args.steps} steps; "
        f"the chain's head is killed (SIGKILL) at step {args.kill_at}"
    )
    status, said, hit = run("failure", args.steps, ["--kill", f"head@step={args.kill_at}"])
    for line in said:
        print("  " + line)
    print(
        f"  run with the failure:    exit {status}, {hit.get('steps')} steps, accuracy "
        f"{hit.get('final_test_accuracy', float('nan')):.4f}, weights "
        f"{str(hit.get('weights_sha256'))[:16]}  ({hit['run_dir']})"
    )
    ref_status, _, ref = run("reference", args.steps, [])
    print(
        f"  run without the failure: exit {ref_status}, {ref.get('steps')} steps, accuracy "
        f"{ref.get('final_test_accuracy', float('nan')):.4f}, weights "
        f"{str(ref.get('weights_sha256'))[:16]}  ({ref['run_dir']})"
    )
    equal = bool(hit.get("weights_sha256")) and hit.get("weights_sha256") == ref.get(
        "weights_sha256"
    )
    print(
        "final weights: bit-for-bit equal: the failure cost time, not results"
        if equal
        else "final weights DIFFER (see the run directories above)"
    )
    return 0 if status == 0 and ref_status == 0 and equal else 1


if __name__ == "__main__":
    sys.exit(main())
