"""The fault matrix (tests/mpi/matrix.py): its construction, and the CI slice run under real
SIGKILLs (``-m matrix_ci``; the whole matrix is ``python -m tests.mpi.matrix --full``)."""

from __future__ import annotations

import pytest

from ftmpi.config import Config
from ftmpi.failpoints import parse_failpoints
from ftmpi.faults import check_schedule, parse_schedule
from tests.mpi.common import STEPS
from tests.mpi.matrix import (
    MODES,
    MOMENTS,
    STRATEGIES,
    VICTIMS,
    References,
    all_cells,
    ci_slice,
    interleaved,
    run_cell,
)

CELLS = all_cells()
SLICE = ci_slice()


def _covered(cells, dim):
    return {getattr(c, dim) for c in cells}


@pytest.mark.parametrize("cells", [CELLS, SLICE], ids=["full", "ci-slice"])
def test_every_strategy_mode_victim_and_moment_appears(cells):
    assert _covered(cells, "strategy") == set(STRATEGIES)
    assert _covered(cells, "mode") == set(MODES)
    assert _covered(cells, "victim") == set(VICTIMS)
    assert _covered(cells, "moment") == set(MOMENTS)


def test_cells_that_cannot_happen_are_not_generated():
    ids = [c.id for c in CELLS]
    assert len(ids) == len(set(ids))
    for c in CELLS:
        s = STRATEGIES[c.strategy]
        assert c.victim != "middle" or s.chain, c.id
        assert c.moment != "snapshot_write" or c.strategy == "checkpoint", c.id
        assert c.moment not in ("reconfigure", "state_transfer") or s.chain, c.id
        assert c.moment != "pull" or c.victim == "worker", c.id
    assert len(SLICE) < len(CELLS) / 5 and interleaved(CELLS)[: len(SLICE)] == SLICE


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_every_cell_is_a_valid_configuration(cell):
    """Each cell's FTMPI_* variables pass ftmpi's own checks, its kills name existing ranks."""
    s = STRATEGIES[cell.strategy]
    cfg = Config.from_env({**cell.env(), "FTMPI_SERVERS": str(s.servers), "FTMPI_RUN_DIR": "r"})
    shards = s.servers // cfg.chain_length if cfg.chained else s.servers
    check_schedule(parse_schedule(cfg.kill), workers=2, servers=s.servers, shards=shards)
    kills = parse_schedule(cfg.kill)
    armed = parse_failpoints(cfg.failpoints)
    assert cell.expected_kills == len(kills) + len(armed) >= 1
    assert all(k.step is None or k.step < STEPS for k in kills)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    from tests.conftest import run_mpi

    return References(run_mpi, tmp_path_factory.mktemp("refs"), timeout=300)


OPEN_BUGS: dict[str, str] = {}
"""Slice cells that show a documented open bug: they run, and are reported as expected
failures until the bug is fixed (then they pass and are reported as such)."""


@pytest.mark.parametrize(
    "cell",
    [
        pytest.param(c, marks=pytest.mark.xfail(reason=OPEN_BUGS[c.id], strict=False))
        if c.id in OPEN_BUGS
        else c
        for c in SLICE
    ],
    ids=lambda c: c.id,
)
@pytest.mark.mpi
@pytest.mark.matrix_ci
@pytest.mark.timeout(900)  # the first cell of a strategy also runs its reference
def test_fault_matrix_ci_slice(mpi, tmp_path, references, cell):
    out = run_cell(cell, mpi, tmp_path, references, timeout=300)
    assert out.ok, f"{cell.id} env={cell.env()}: " + "; ".join(out.failures)
    assert out.kills == cell.expected_kills and len(out.checked) >= 5


@pytest.mark.mpi
@pytest.mark.timeout(900)
def test_a_push_answered_before_its_step_failed_is_not_applied_twice(mpi, tmp_path, references):
    """Two shards, sync: server 0 dies at step 37 after applying it; worker 1 had shard 1's
    reply (version 37) when the step failed. Its retry must not apply step 37 again (shard 1
    ended at version 61 of 60 steps when the retry carried the version of the reply)."""
    [cell] = [c for c in CELLS if c.id == "stateless-sync-head-step"]
    out = run_cell(cell, mpi, tmp_path, references, timeout=300)
    assert out.ok, "; ".join(out.failures)
    assert "version == gradients computed" in out.checked


@pytest.mark.mpi
@pytest.mark.timeout(900)
def test_a_stateless_replacement_dying_after_its_replay_loses_nothing(mpi, tmp_path, references):
    """Sync stateless, server 0 killed at step 20 and its replacement right after replaying the
    workers' log (before any worker pulled). Worker 0 used to keep the replay's weights and
    version while worker 1 kept the old ones, the log was dropped, and the workers ended with
    different weights (`0.weight` differed) and 32 logged gradients never applied. The log is
    now kept until the pull: the second replacement is rebuilt from the same weights plus the
    whole log."""
    [cell] = [c for c in CELLS if c.id == "stateless-sync-twice-step"]
    out = run_cell(cell, mpi, tmp_path, references, timeout=300)
    assert out.ok, "; ".join(out.failures)
    assert {"workers agree", "server replayed == logged"} <= set(out.checked)
