"""ftmpi.guards.deadline: an uncancellable MPI call that does not return in time ends the
process with a clear message instead of hanging it."""

from __future__ import annotations

import json
import subprocess
import sys

from ftmpi.guards import STUCK_EXIT

PROG = """
import time
from ftmpi.config import Config
from ftmpi.guards import deadline
cfg = Config.from_env({{}}, timeout={timeout}, run_dir={run_dir!r})
with deadline(cfg, "worker 0", "spawning replacements (MPI_Comm_spawn + merge)"):
    time.sleep({sleep})
print("returned")
"""


def run(tmp_path, timeout: float, sleep: float) -> subprocess.CompletedProcess[str]:
    code = PROG.format(timeout=timeout, run_dir=str(tmp_path), sleep=sleep)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_a_stuck_call_ends_the_process_and_says_why(tmp_path):
    res = run(tmp_path, timeout=0.5, sleep=30)
    assert res.returncode == STUCK_EXIT, res.stderr
    assert "returned" not in res.stdout
    assert "spawning replacements (MPI_Comm_spawn + merge) did not complete within 0.5 s" in (
        res.stderr
    )
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["recovery_stuck"]


def test_a_call_that_returns_in_time_is_left_alone(tmp_path):
    res = run(tmp_path, timeout=5, sleep=0.1)
    assert res.returncode == 0 and res.stdout.strip() == "returned", res.stderr
    assert not (tmp_path / "events.jsonl").exists()
