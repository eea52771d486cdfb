"""Gradient averaging during backward (``overlap``, ``ftmpi.buckets``): the weights equal a single
process applying the optimizer to the averaged gradients after every step, buckets do start
inside backward, and misuse is refused with a clear error."""

from __future__ import annotations

import pytest

from tests.conftest import PROGS

pytestmark = pytest.mark.mpi

PROG = str(PROGS / "overlap.py")
SMALL = {"FTMPI_BUCKET_BYTES": "1000", "FTMPI_BACKEND": "mpi"}  # several buckets per model


@pytest.mark.parametrize(
    ("case", "servers", "placement"),
    [
        ("plain", 0, "server"),
        ("plain", 1, "server"),
        ("plain", 1, "mirror"),
        ("frozen", 0, "server"),
        ("accumulate", 1, "server"),
        ("synchronize", 1, "mirror"),
    ],
)
def test_buckets_start_in_backward_and_the_weights_are_exact(mpi, case, servers, placement):
    env = {**SMALL, "FTMPI_SERVERS": str(servers), "FTMPI_PLACEMENT": placement}
    res = mpi(2 + servers, [PROG, case, "5"], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (report,) = res.json_lines()
    assert report["max_abs_diff"] == 0.0, report
    assert report["in_backward"] >= 5, "no bucket started inside backward"


def test_a_parameter_without_gradient_is_averaged_at_the_step(mpi):
    # the unused layer shares the first bucket with the last layer: nothing starts early, and
    # its zeros are copied in at the step
    res = mpi(2, [PROG, "unused", "5"], env={**SMALL, "FTMPI_SERVERS": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    (report,) = res.json_lines()
    assert report == {"max_abs_diff": 0.0, "in_backward": 0}


def test_overlap_off_averages_at_the_step(mpi):
    env = {**SMALL, "FTMPI_SERVERS": "1", "FTMPI_OVERLAP": "0"}
    res = mpi(3, [PROG, "plain", "5"], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    (report,) = res.json_lines()
    assert report == {"max_abs_diff": 0.0, "in_backward": 0}


def test_more_backward_passes_than_declared_is_a_clear_error(mpi):
    res = mpi(2, [PROG, "twice", "1"], env={**SMALL, "FTMPI_SERVERS": "0"})
    assert res.returncode == 0, res.stderr[-3000:]
    (report,) = res.json_lines()
    assert "got a gradient 2 times before step()" in report["error"]
    assert "backward_passes_per_step is 1" in report["error"]
