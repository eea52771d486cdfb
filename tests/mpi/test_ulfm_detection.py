"""ftmpi asks MPI whether it survives rank deaths (Open MPI's ``mpi_ft_enable`` control
variable, through MPI_T), and its answer matches the fact: with ``--with-ft ulfm`` a rank's
SIGKILL is survived, without it the job is aborted."""

from __future__ import annotations

import pytest

from tests.conftest import MPIRUN, PROGS, mpi_command, run_command

pytestmark = pytest.mark.mpi

PROBE = str(PROGS / "ulfm_probe.py")


def _probe(extra: list[str], *, ulfm: bool) -> tuple[bool, bool, int]:
    """(ftmpi's answer, whether rank 0 survived rank 1's death, mpirun's status)."""
    cmd = mpi_command(2, [PROBE])
    if not ulfm:
        cmd = [c for c in cmd if c not in ("--with-ft", "ulfm")]
    cmd[1:1] = extra
    res = run_command(cmd, timeout=120)
    lines = res.json_lines()
    answers = [d["ulfm_enabled"] for d in lines if "ulfm_enabled" in d]
    assert len(answers) == 1, res.stdout + res.stderr[-2000:]
    # Open MPI 5's finalize flag is found and set (read back), with or without ULFM
    assert [d["fence_skipped"] for d in lines if "fence_skipped" in d] == [True], res.stdout
    return answers[0], any(d.get("survived") for d in lines), res.returncode


@pytest.mark.parametrize(
    ("extra", "ulfm", "expected"),
    [
        ([], True, True),
        ([], False, False),
        # the same switch in another spelling Open MPI accepts (its enum: 1|t|true|enabled|yes|y)
        (["-x", "OMPI_MCA_mpi_ft_enable=enabled"], True, True),
        (["-x", "OMPI_MCA_mpi_ft_enable=y"], True, True),
    ],
    ids=["with-ft-ulfm", "without", "spelled-enabled", "spelled-y"],
)
def test_ulfm_is_asked_of_mpi_and_matches_whether_a_death_is_survived(extra, ulfm, expected):
    assert MPIRUN.exists()
    answer, survived, rc = _probe(extra, ulfm=ulfm)
    assert survived is expected, rc
    assert answer is expected
    assert (rc == 0) is expected, rc
