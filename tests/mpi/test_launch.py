"""``ftmpi-run`` end to end: a server kill survived in the job, and a job without ULFM that dies
and is relaunched by the launcher, resuming from its snapshots."""

from __future__ import annotations

import json
import sys

import pytest

from ftmpi.events import read_events
from tests.conftest import PROGS, ROOT, run_command

pytestmark = pytest.mark.mpi

FTMPI_RUN = [sys.executable, "-m", "launch.cli"]


def test_server_kill_is_survived_and_logged_in_order(tmp_path):
    run_dir = tmp_path / "run"
    res = run_command(
        [
            *FTMPI_RUN,
            *("-np", "2", "--servers", "1", "--strategy", "checkpoint"),
            *("--checkpoint-every", "10", "--kill", "server:0@step=20", "--steps", "40"),
            *("--run-dir", str(run_dir), "--"),
            *(sys.executable, str(ROOT / "examples" / "paper_trainer.py")),
            *("--data", "synthetic:512", "--steps", "40", "--eval-every", "25", "--no-progress"),
        ],
        env={"FTMPI_BACKEND": "mpi"},
        timeout=150,
        # the documented exit hang after a re-spawn: results are complete, the job is killed
        exit_hang_ok=(run_dir / "summary.json").exists,
    )
    assert res.returncode in (0, -9), res.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40
    events = read_events(str(run_dir))
    kills = [e for e in events if e["event"] == "kill"]
    assert [e["spec"] for e in kills if e.get("source") == "launcher"] == ["server:0@step=20"]
    # the dying rank's own kill event if it logs one; else the launcher's, which is stamped
    # when the launcher read the rank's last line
    kill = next((e for e in kills if e.get("source") != "launcher"), kills[0])
    first = {"kill": kill["time"]}
    for e in events:
        first.setdefault(e["event"], e["time"])
    assert first["kill"] <= first["failure_detected"] < first["replacement_ready"]
    assert first["replacement_ready"] < first["restored"], [e["event"] for e in events]
    if res.returncode == 0:
        record = json.loads((run_dir / "launcher.json").read_text())
        assert record["restarts"] == 0 and record["returncode"] == 0
        assert "after 0 restart(s)" in res.stdout
    summary = run_command([*FTMPI_RUN, "summary", str(run_dir)], timeout=60)
    assert summary.returncode == 0, summary.stderr
    assert "kills" in summary.stdout and "checkpoint" in summary.stdout


def test_without_ulfm_the_launcher_relaunches_and_training_resumes(tmp_path):
    prog = [sys.executable, str(PROGS / "ft_train.py"), "60"]
    common = ["-np", "2", "--servers", "1", "--strategy", "checkpoint", "--checkpoint-every", "10"]
    ref = run_command(
        [*FTMPI_RUN, *common, "--run-dir", str(tmp_path / "ref"), "--", *prog],
        env={"FTMPI_BACKEND": "mpi"},
        timeout=120,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir = tmp_path / "restarted"
    res = run_command(
        [
            *FTMPI_RUN,
            *common,
            *("--no-ulfm", "--max-restarts", "1", "--kill", "server:0@step=25", "--steps", "60"),
            *("--run-dir", str(run_dir), "--", *prog),
        ],
        env={"FTMPI_BACKEND": "mpi"},
        timeout=180,
    )
    record = json.loads((run_dir / "launcher.json").read_text())
    assert [a["returncode"] != 0 for a in record["attempts"]] == [True, False], res.stderr[-3000:]
    assert res.returncode == 0 and record["restarts"] == 1
    assert [a["kill"] for a in record["attempts"]] == ["server:0@step=25", ""]
    assert [a["resume"] for a in record["attempts"]] == [0, 1]
    assert record["attempts"][1]["lost_seconds"] > 0 and record["lost_seconds"] > 0
    assert "after 1 restart(s)" in res.stdout
    got = sorted(res.json_lines(), key=lambda r: r["worker"])
    want = sorted(ref.json_lines(), key=lambda r: r["worker"])
    assert [r["position"] for r in got] == [60, 60]
    # the server died after update 25: the relaunch resumes from the snapshot at step 20
    assert [r["computed"] for r in got] == [40, 40]
    assert got[0]["weights"] == got[1]["weights"] == want[0]["weights"]
