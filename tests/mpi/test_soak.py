"""The randomised soak (tests/mpi/soak.py): its seeded schedule, and a short soak in CI (the
long one is ``python -m tests.mpi.soak --seconds 600``)."""

from __future__ import annotations

import pytest

from ftmpi.faults import format_schedule
from tests.mpi.soak import START, run_soak, schedule, steps_for

SEED = 20261123
"""The CI soak's seed (a failure names it; replay with python -m tests.mpi.soak --seed)."""


def test_schedule_is_a_pure_function_of_the_seed():
    a = schedule(SEED, seconds=600, every=8, servers=2)
    assert a == schedule(SEED, seconds=600, every=8, servers=2)
    other = schedule(SEED + 1, seconds=600, every=8, servers=2)
    assert format_schedule(a) != format_schedule(other)
    times = [k.seconds for k in a]
    assert times == sorted(times) and times[0] > START and times[-1] < 600
    assert 40 <= len(a) <= 120  # a kill every 4..12 s
    assert sum(k.role == "worker" for k in a) <= 1
    assert {k.index for k in a if k.role == "server"} == {0, 1}


@pytest.mark.mpi
@pytest.mark.matrix_ci
@pytest.mark.timeout(900)
@pytest.mark.xfail(
    reason="open bug 1 (docs/recovery.md, known limitations): a death while the survivors "
    "spawn a replacement can hang the recovery; the soak's seeded schedule can hit it",
    strict=False,
)
def test_short_soak(mpi, tmp_path):
    out, kill = run_soak(mpi, tmp_path, seed=SEED, seconds=30, every=7)
    assert out.ok, f"soak seed {SEED}, FTMPI_KILL={kill}: " + "; ".join(out.failures)
    assert out.kills >= 2 and "bit-exact vs no failure" in out.checked, (out.kills, kill)
    assert steps_for(30) == 300
