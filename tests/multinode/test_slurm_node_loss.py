"""A Slurm batch job (``slurm/train.sbatch``, 3 nodes) losing a whole node: Open MPI ends the
MPI job, ``ftmpi-run`` (inside the allocation, ``--max-restarts``) names the lost node and
relaunches on the two surviving nodes of the same allocation (``--no-kill`` keeps it), the
run resumes from the newest snapshot, and the job ends ``COMPLETED`` with the weights of the
same run without the failure."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROGS, ROOT, run_mpi
from tests.slurm.cluster import FINAL_STATES, SlurmCluster

pytestmark = pytest.mark.multinode

VENV = Path(sys.executable).parent.parent
STEPS = 150
TRAINER_ARGS = f"{STEPS} --step-sleep 0.05"
SETTINGS = {"FTMPI_CHECKPOINT_EVERY": "5", "FTMPI_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
KILLED_AT = 20
"""The node is killed once a snapshot of this version is on the shared filesystem."""


def newest_snapshot(run_dir: Path) -> int:
    files = run_dir.glob("**/*.ftck")
    return max((int(f.name.split("-v")[1].split(".")[0]) for f in files), default=0)


@pytest.mark.timeout(420)
def test_a_slurm_job_survives_a_lost_node_inside_its_allocation(
    slurm_cluster: SlurmCluster, tmp_path: Path
):
    ref = tmp_path / "ref"
    env = {**SETTINGS, "FTMPI_SERVERS": "3", "FTMPI_STRATEGY": "checkpoint"}
    res = run_mpi(
        5,
        [str(PROGS / "ft_train.py"), *TRAINER_ARGS.split()],
        env={**env, "FTMPI_RUN_DIR": str(ref), "FTMPI_BACKEND": "mpi"},
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    want = json.loads((ref / "summary.json").read_text())["weights_sha256"]

    cluster = slurm_cluster.nodes
    runs = cluster.shared / "slurm-runs"
    out = slurm_cluster.root / "job.out"
    job = slurm_cluster.sbatch(
        ROOT / "slurm" / "train.sbatch",
        *("-N", "3", "--ntasks=5", "--time=6", f"--output={out}"),
        env={
            **SETTINGS,
            **{"FTMPI_HOME": str(ROOT), "FTMPI_VENV": str(VENV), "RUNS_DIR": str(runs)},
            **{"SERVERS": "3", "TRAINER": str(PROGS / "ft_train.py")},
            "TRAINER_ARGS": TRAINER_ARGS,
        },
        cwd=ROOT,
    )
    run_dir = runs / f"slurm-{job}"
    deadline = time.monotonic() + 200
    while newest_snapshot(run_dir) < KILLED_AT:
        if slurm_cluster.job(job)["JobState"] in FINAL_STATES or time.monotonic() > deadline:
            raise AssertionError(out.read_text() if out.exists() else "no job output")
        time.sleep(0.3)
    cluster.kill_node("n3")  # slurmd, Open MPI's daemon, the ranks, /dev/shm and /tmp
    died = time.time()
    fields = slurm_cluster.wait_job(job, lambda f: f["JobState"] in FINAL_STATES, 240, "its end")
    text = out.read_text()
    assert fields["JobState"] == "COMPLETED", text[-5000:]
    assert slurm_cluster.accounting(job) == ("COMPLETED", "0:0")
    assert "node n3 was lost" in text and "the relaunch runs on n1, n2" in text, text[-5000:]
    first, second = json.loads((run_dir / "launcher.json").read_text())["attempts"]
    assert first["status"] == 4 and first["lost_nodes"] == ["n3"]
    assert second["status"] == 0
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and min(e["position"] for e in resumed) >= KILLED_AT, "resumed from step 0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == STEPS
    assert summary["weights_sha256"] == want
    print(f"node death -> training resumed {min(e['time'] for e in resumed) - died:.1f} s")
