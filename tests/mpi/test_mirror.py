"""``mirror`` placement: the workers step their own optimizer as plain Horovod does and the
servers keep a mirror (the weights are plain Horovod's, bit for bit: ``test_horovod.py``). A
server or worker death costs no rollback and ends with the weights of the run without failure
(which equal the server placement's); a run whose workers are all gone resumes from the
mirror."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ftmpi.events import read_events
from tests.conftest import run_command
from tests.mpi.common import PROG

pytestmark = pytest.mark.mpi

STEPS = 40
ENV = {"FTMPI_BACKEND": "mpi", "FTMPI_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}


def _ftmpi_run(run_dir: Path, *options: str, steps: int = STEPS, env=None) -> dict:
    """``ftmpi-run -np 2 OPTIONS -- ft_train.py STEPS``; its summary, worker 0's report, events."""
    res = run_command(
        [
            *(sys.executable, "-m", "launch.cli", "-np", "2", *options),
            *("--run-dir", str(run_dir), "--", sys.executable, PROG, str(steps)),
            "--await-replacements",
        ],
        env={**ENV, **(env or {})},
        timeout=150,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == steps
    report = next(r for r in res.json_lines() if r["worker"] == 0)
    return {"summary": summary, "report": report, "events": read_events(str(run_dir))}


@pytest.fixture(scope="module")
def server_placement(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The weights of the chain of 3 without failure in the default (server) placement."""
    run = _ftmpi_run(tmp_path_factory.mktemp("server"), "--servers", "3", "--strategy", "chain")
    return str(run["summary"]["weights_sha256"])


@pytest.mark.parametrize(
    "kill",
    ["head@step=20", "server:1@step=20", "tail@step=20", "worker:1@step=20"],
    ids=["head", "middle", "tail", "worker-respawned"],
)
def test_a_death_costs_no_rollback_and_ends_with_the_weights_without_failure(
    tmp_path, server_placement, kill
):
    options = ["--servers", "3", "--strategy", "chain", "--placement", "mirror", "--kill", kill]
    if kill.startswith("worker"):
        options.append("--respawn-workers")
    run = _ftmpi_run(tmp_path, *options)
    assert run["summary"]["weights_sha256"] == server_placement
    kinds = [e["event"] for e in run["events"]]
    assert "failure_detected" in kinds and "step_resumed" in kinds
    assert "rollback" not in kinds and "repushed" not in kinds
    assert run["report"]["rollbacks"] == 0
    # every update reached the mirror: each shard's servers are at the step count
    assert run["report"]["versions"] == [STEPS]


def test_a_run_whose_workers_are_gone_resumes_from_the_mirror_bit_exact(tmp_path):
    options = ("--servers", "2", "--strategy", "checkpoint", "--placement", "mirror")
    env = {"FTMPI_CHECKPOINT_EVERY": "10"}
    whole = _ftmpi_run(tmp_path / "whole", *options, env=env)
    _ftmpi_run(tmp_path / "first", *options, steps=25, env=env)  # its last snapshot: 20
    again = _ftmpi_run(
        tmp_path / "again",
        *options,
        env={
            **env,
            "FTMPI_RESUME": "1",
            "FTMPI_CHECKPOINT_DIR": str(tmp_path / "first" / "checkpoints"),
        },
        steps=STEPS,
    )
    assert [e["position"] for e in again["events"] if e["event"] == "resumed"] == [20, 20]
    # the workers' optimizer state (momentum) came back from the mirror too
    assert again["summary"]["weights_sha256"] == whole["summary"]["weights_sha256"]
