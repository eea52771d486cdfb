"""The sbatch scripts in slurm/, submitted to a real single-node Slurm (fixture ``slurm``).

Each job runs 2 workers + 1 server (3 tasks overcommitted on a small machine) on a short
training run; the scripts' site variables are overridden through the job's environment. A job's
final state is also checked where a site sees it, in accounting (``sacct``): it follows the
training's outcome, not the MPI launcher's exit status.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ftmpi.events import read_events
from tests.conftest import ROOT
from tests.slurm.cluster import FINAL_STATES, SlurmCluster, SlurmError

pytestmark = pytest.mark.slurm

SCRIPTS = ROOT / "slurm"
ONE_NODE = ("--nodes=1", "--ntasks=3", "--overcommit", "--time=10")
"""Two workers and a server on this one node, whatever the scripts ask for."""
FINAL = FINAL_STATES
QUICK = "--data synthetic --eval-every 20 --no-progress"


def submit(slurm: SlurmCluster, script: str, *options: str, **variables: str) -> int:
    """Submit ``slurm/<script>`` from the checkout with the job's output in the cluster's
    directory and its run directory under ``<cluster>/runs``."""
    env = {"FTMPI_VENV": sys.prefix, "RUNS_DIR": str(slurm.root / "runs"), **variables}
    return slurm.sbatch(
        SCRIPTS / script,
        *ONE_NODE,
        f"--output={slurm.root}/job-%j.out",
        *options,
        env=env,
        cwd=ROOT,
    )


def finish(slurm: SlurmCluster, job_id: int, timeout: float) -> tuple[dict[str, str], str]:
    """Wait until the job has ended; its fields and its output. A job still running after
    ``timeout`` seconds fails the test with the tail of its output."""
    try:
        fields = slurm.wait_job(job_id, lambda f: f["JobState"] in FINAL, timeout, "the job to end")
    except SlurmError as exc:
        pytest.fail(f"{exc}\njob output:\n{output(slurm, job_id)[-6000:]}")
    return fields, output(slurm, job_id)


def output(slurm: SlurmCluster, job_id: int) -> str:
    path = slurm.root / f"job-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def run_dir(slurm: SlurmCluster, job_id: int) -> Path:
    return slurm.root / "runs" / f"slurm-{job_id}"


@pytest.mark.timeout(180)
def test_training_job_runs_workers_and_servers_under_mpirun(slurm):
    job = submit(slurm, "train.sbatch", TRAINER_ARGS=f"{QUICK} --steps 60")
    fields, out = finish(slurm, job, 170)
    assert fields["JobState"] == "COMPLETED", out[-4000:]
    assert slurm.accounting(job) == ("COMPLETED", "0:0"), out[-4000:]
    assert "mpirun --with-ft ulfm" in out
    assert "2 worker(s), 1 server(s)" in out
    assert "final test accuracy" in out
    summary = json.loads((run_dir(slurm, job) / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["servers"] == 1 and summary["steps"] == 60
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0


@pytest.mark.timeout(180)
def test_failure_injection_job_survives_a_server_kill(slurm):
    job = submit(
        slurm,
        "train-faults.sbatch",
        TRAINER_ARGS=f"{QUICK} --steps 60",
        KILL="server:0@step=25",
        FTMPI_DOWN_FOR="1",
        FTMPI_CHECKPOINT_EVERY="10",
        EXIT_GRACE="15",
    )
    fields, out = finish(slurm, job, 170)
    assert fields["JobState"] == "COMPLETED", out[-4000:]
    assert slurm.accounting(job) == ("COMPLETED", "0:0"), out[-4000:]
    assert "server 0 died; recovering with strategy checkpoint" in out, out[-4000:]
    events = read_events(str(run_dir(slurm, job)))
    assert {e["spec"] for e in events if e["event"] == "kill"} == {"server:0@step=25"}, events
    kinds = [e["event"] for e in events]
    for before, after in [
        ("failure_detected", "replacement_ready"),
        ("replacement_ready", "restored"),
        ("restored", "rollback"),
    ]:
        assert before in kinds and after in kinds, kinds
        assert kinds.index(before) < kinds.index(after), kinds
    summary = json.loads((run_dir(slurm, job) / "summary.json").read_text())
    assert summary["steps"] == 60


@pytest.mark.timeout(180)
def test_job_that_survives_its_replacement_killed_too_is_completed(slurm):
    """Server 0 is killed, and so is its replacement: Open MPI's mpirun then exits 137 although
    training goes on and finishes (open-mpi/ompi#13325). The job's state follows the training's
    record (a finished summary.json), so accounting says COMPLETED with exit code 0."""
    job = submit(
        slurm,
        "train-faults.sbatch",
        TRAINER_ARGS=f"{QUICK} --steps 50",
        KILL="server:0@step=15,server:0@step=35",
        FTMPI_DOWN_FOR="1",
        FTMPI_CHECKPOINT_EVERY="10",
        EXIT_GRACE="15",
    )
    fields, out = finish(slurm, job, 170)
    assert slurm.accounting(job) == ("COMPLETED", "0:0"), out[-4000:]
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", fields
    events = read_events(str(run_dir(slurm, job)))
    kills = {e["spec"] for e in events if e["event"] == "kill"}
    assert kills == {"server:0@step=15", "server:0@step=35"}, events
    assert [e["version"] for e in events if e["event"] == "restored"] == [10, 30], events
    summary = json.loads((run_dir(slurm, job) / "summary.json").read_text())
    assert summary["steps"] == 50
    assert "training finished" in out and "the job succeeds" in out, out[-4000:]


@pytest.mark.timeout(120)
def test_job_whose_training_did_not_finish_is_failed(slurm):
    """A worker raises at step 5: training does not finish, so the job fails, in scontrol and in
    accounting, with a non-zero exit code, and is not requeued."""
    job = submit(
        slurm,
        "train.sbatch",
        TRAINER="tests/mpi/progs/ft_train.py",
        TRAINER_ARGS="30 --raise-at 5",
    )
    fields, out = finish(slurm, job, 110)
    state, exit_code = slurm.accounting(job)
    assert state == "FAILED", (state, exit_code, out[-4000:])
    assert exit_code != "0:0" and exit_code.endswith(":0"), exit_code  # a status, not a signal
    assert fields["JobState"] == "FAILED" and fields["Restarts"] == "0", fields
    assert not (run_dir(slurm, job) / "summary.json").exists() or not json.loads(
        (run_dir(slurm, job) / "summary.json").read_text()
    ).get("finished")
    assert "training did not finish" in out, out[-4000:]
    assert "a bug in the training script at step 5" in out, out[-4000:]


@pytest.mark.timeout(240)
def test_usr1_checkpoints_requeues_and_the_rerun_resumes(slurm):
    job = submit(slurm, "train.sbatch", TRAINER_ARGS=f"{QUICK} --duration 15 --eval-every 10")
    metrics = run_dir(slurm, job) / "metrics.jsonl"
    slurm.wait_job(
        job,
        lambda f: f["JobState"] in FINAL or (metrics.exists() and metrics.stat().st_size > 0),
        120,
        "the first evaluation",
    )
    slurm.client(["scancel", "--signal=USR1", "--batch", str(job)])
    fields, out = finish(slurm, job, 200)
    assert fields["JobState"] == "COMPLETED", out[-4000:]
    assert fields["Restarts"] == "1", fields
    assert slurm.accounting(job) == ("COMPLETED", "0:0"), out[-4000:]
    assert "SLURM_RESTART_COUNT=1" in out and "FTMPI_RESUME=1" in out, out[-4000:]
    events = read_events(str(run_dir(slurm, job)))
    checkpoints = [e for e in events if e["event"] == "signal_checkpoint"]
    assert len(checkpoints) == 1, f"no signal_checkpoint event after SIGUSR1:\n{out[-4000:]}"
    version = checkpoints[0]["version"]
    assert version > 0
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed, f"the re-run did not resume:\n{out[-4000:]}"
    assert {p for e in resumed for p in resumed_steps(e)} == {version}, (resumed, version)


@pytest.mark.timeout(180)
def test_srun_job_restarts_from_durable_state_after_a_rank_death(slurm):
    """Without ULFM (srun --mpi=pmix) a server death ends the MPI job; ftmpi-run starts it
    again inside the allocation and it resumes from the newest snapshot."""
    job = submit(
        slurm,
        "train-srun.sbatch",
        TRAINER_ARGS=f"{QUICK} --steps 40",
        FTMPI_KILL="server:0@step=25",
        FTMPI_CHECKPOINT_EVERY="10",
    )
    fields, out = finish(slurm, job, 170)
    assert fields["JobState"] == "COMPLETED", out[-4000:]
    assert slurm.accounting(job) == ("COMPLETED", "0:0"), out[-4000:]
    assert "srun --mpi=pmix" in out
    launcher = json.loads((run_dir(slurm, job) / "launcher.json").read_text())
    assert launcher["restarts"] >= 1, launcher
    events = read_events(str(run_dir(slurm, job)))
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed_steps(resumed[0]) == {20}, resumed
    summary = json.loads((run_dir(slurm, job) / "summary.json").read_text())
    assert summary["steps"] == 40


def resumed_steps(event: dict) -> set[int]:
    """The data position(s) a ``resumed`` event names: one step, or one per worker."""
    pos = event["position"]
    if isinstance(pos, dict):
        return set(pos.values())
    return set(pos) if isinstance(pos, list) else {pos}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "script", ["train.sbatch", "train-faults.sbatch", "train-srun.sbatch", "experiment.sbatch"]
)
def test_script_is_accepted_by_sbatch(slurm, script):
    """Every script's directives are valid (``sbatch --test-only`` schedules nothing)."""
    slurm.client(["sbatch", "--test-only", *ONE_NODE, str(SCRIPTS / script)], cwd=ROOT)
