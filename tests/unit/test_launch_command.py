"""Exact command lines for mpirun, srun and mpiexec, and launcher-program lookup."""

from __future__ import annotations

import pytest

from launch.command import (
    KEEPALIVE,
    JobSpec,
    LaunchError,
    build_command,
    find_launcher,
    process_env,
)

ENV = {"FTMPI_SERVERS": "1", "FTMPI_KILL": "server:0@step=5,worker:1@30s", "FTMPI_SEED": "3"}
CMD = ["python", "train.py", "--steps", "40"]


def spec(launcher: str, **kw) -> JobSpec:
    return JobSpec(launcher, f"/opt/{launcher}", 3, ENV, CMD, **kw)


def test_mpirun_forwards_every_variable_with_x_and_enables_ulfm():
    assert build_command(spec("mpirun", cpus=2)) == [
        "/opt/mpirun",
        "--with-ft",
        "ulfm",
        "--oversubscribe",
        "-np",
        "3",
        "-x",
        "FTMPI_KILL=server:0@step=5,worker:1@30s",
        "-x",
        "FTMPI_SEED=3",
        "-x",
        "FTMPI_SERVERS=1",
        *CMD,
    ]


def test_mpirun_hosts_root_and_no_ulfm():
    got = build_command(
        spec("mpirun", hosts="n1:2,n2:2", hostfile="hf", ulfm=False, as_root=True, cpus=1)
    )
    head = ["/opt/mpirun", "--allow-run-as-root", "-H", "n1:2,n2:2", "--hostfile", "hf"]
    keepalive = [w for k, v in KEEPALIVE.items() for w in ("--prtemca", k, v)]
    spread = ["--map-by", "node:oversubscribe", *keepalive]
    assert got[: len(head) + len(spread) + 2] == [*head, *spread, "-np", "3"]


def test_mpirun_does_not_oversubscribe_within_the_cores():
    assert "--oversubscribe" not in build_command(spec("mpirun", cpus=8))


def test_srun_exports_variables_and_leaves_comma_values_to_its_environment():
    assert build_command(spec("srun", hosts="n1:4,n2:4")) == [
        "/opt/srun",
        "--mpi=pmix",
        "-n",
        "3",
        "--nodelist=n1,n2",
        "--export=ALL,FTMPI_SEED=3,FTMPI_SERVERS=1",
        *CMD,
    ]
    assert process_env(ENV, {"PATH": "/bin"})["FTMPI_KILL"] == ENV["FTMPI_KILL"]


def test_srun_refuses_a_hostfile():
    with pytest.raises(LaunchError, match="srun takes no hostfile"):
        build_command(spec("srun", hostfile="hf"))


def test_mpiexec_passes_variables_through_its_environment():
    assert build_command(spec("mpiexec")) == ["/opt/mpiexec", "-n", "3", *CMD]
    assert build_command(spec("mpiexec", hosts="n1,n2", hostfile="hf")) == [
        "/opt/mpiexec",
        "-n",
        "3",
        "-host",
        "n1,n2",
        "-f",
        "hf",
        *CMD,
    ]
    assert process_env(ENV, {"FTMPI_SEED": "0", "HOME": "/h"}) == {**ENV, "HOME": "/h"}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"launcher": "qsub"}, "launcher 'qsub' is not one of"),
        ({"nprocs": 0}, "at least one rank"),
        ({"command": []}, "no training command"),
    ],
)
def test_bad_specs_are_refused(kw, message):
    base = {"launcher": "mpirun", "executable": "mpirun", "nprocs": 2, "env": {}, "command": CMD}
    with pytest.raises(LaunchError, match=message):
        build_command(JobSpec(**{**base, **kw}))


def test_find_launcher(tmp_path):
    with pytest.raises(LaunchError, match="is not an executable file"):
        find_launcher("mpirun", str(tmp_path / "nope"))
    assert find_launcher("no-such-launcher-xyz", None, required=False) == "no-such-launcher-xyz"
    with pytest.raises(LaunchError, match="no no-such-launcher-xyz found on PATH"):
        find_launcher("no-such-launcher-xyz", None)


def test_a_job_that_fills_the_cores_may_oversubscribe_for_its_replacements():
    assert "--oversubscribe" in build_command(spec("mpirun", cpus=3))  # 3 ranks, 3 cores
    assert "--oversubscribe" not in build_command(spec("mpirun", cpus=4))


def test_inside_a_slurm_allocation_job_steps_may_overlap_unless_the_user_says_otherwise():
    assert "SLURM_OVERLAP" not in process_env(ENV, {"HOME": "/h"})
    assert process_env(ENV, {"SLURM_JOB_ID": "7"})["SLURM_OVERLAP"] == "1"
    assert process_env(ENV, {"SLURM_JOB_ID": "7", "SLURM_OVERLAP": "0"})["SLURM_OVERLAP"] == "0"
