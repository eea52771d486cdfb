"""slurm/ftmpi-job.sh's rule, without a cluster: the job's status is the run's outcome.

``ftmpi_supervise`` returns 0 exactly when the run's record says training finished (a finished
``summary.json``), whatever the launcher returned, and a job whose training finished is not
requeued. The launcher here is a stand-in shell command; ``scontrol`` a stand-in that records
that it was called.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

JOB_SH = ROOT / "slurm" / "ftmpi-job.sh"


def run_job(tmp_path: Path, body: str, *, summary: dict | None = None, restart: int = 0):
    """Run ``body`` in bash after sourcing ftmpi-job.sh, with the run directory in
    ``tmp_path/run`` (holding ``summary`` as summary.json if given); returns the result."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.calls\n')
    fake.chmod(0o755)
    script = f"""
        source {JOB_SH}
        PYTHON={sys.executable}
        FTMPI_RUN_DIR={run_dir}
        SLURM_JOB_ID=7
        SLURM_RESTART_COUNT={restart}
        PATH={bin_dir}:$PATH
        {body}
    """
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("launcher_status", "summary", "expected"),
    [
        (0, {"finished": True}, 0),
        (137, {"finished": True}, 0),  # mpirun after a killed replacement (ompi#13325)
        (5, None, 5),
        (1, {"finished": False}, 1),
        (0, {"finished": False}, 3),  # launch.outcome: ended before the workers finished
        (0, None, 3),
    ],
)
def test_status_is_the_records_outcome(tmp_path, launcher_status, summary, expected):
    res = run_job(tmp_path, f"ftmpi_supervise sh -c 'exit {launcher_status}'", summary=summary)
    assert res.returncode == expected, res.stdout + res.stderr
    if expected == 0:
        assert "the job succeeds" in res.stdout, res.stdout
    else:
        assert "training did not finish" in res.stdout, res.stdout


@pytest.mark.timeout(60)
def test_rerun_of_a_finished_run_succeeds_without_running(tmp_path):
    marker = tmp_path / "ran"
    res = run_job(
        tmp_path, f"ftmpi_supervise touch {marker}", summary={"finished": True}, restart=1
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert not marker.exists()
    assert "nothing to run" in res.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("finished", [True, False])
def test_usr1_requeues_only_an_unfinished_run(tmp_path, finished):
    """SIGUSR1's handler (the launcher already gone, so it waits for no checkpoint)."""
    summary = {"finished": True} if finished else None
    body = "CHECKPOINT_WAIT=0; _ftmpi_launcher=999999999; _ftmpi_checkpoint_and_requeue"
    res = run_job(tmp_path, body, summary=summary)
    assert res.returncode == 0, res.stdout + res.stderr
    calls = tmp_path / "scontrol.calls"
    if finished:
        assert not calls.exists(), calls.read_text()
        assert "no requeue" in res.stdout
    else:
        assert calls.read_text().split() == ["requeue", "7"]
