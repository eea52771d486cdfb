from __future__ import annotations

import pytest

from ftmpi.loop import Rollback, TrainingState, run
from ftmpi.sampler import step_seed


class FakeOptimizer:
    """Stands in for the optimizer only as the flag holder ``run`` sets."""

    _ftmpi_in_run = False


class Batches:
    def __init__(self) -> None:
        self.step = 0


def test_run_rewinds_the_batches_and_calls_again():
    state = TrainingState(FakeOptimizer(), Batches())
    seen: list[int] = []
    failed = []

    @run
    def train(state: TrainingState) -> str:
        assert state.optimizer._ftmpi_in_run
        while state.batches.step < 6:
            step = state.batches.step
            state.batches.step += 1
            seen.append(step)
            if step == 4 and not failed:
                failed.append(step)
                raise Rollback(2)
        return "done"

    assert train(state) == "done"
    assert seen == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert state.rollbacks == 1
    assert not state.optimizer._ftmpi_in_run


def test_other_exceptions_pass_through():
    @run
    def train(state: TrainingState) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        train(TrainingState(FakeOptimizer()))


def test_step_seed_is_pure_and_distinct():
    assert step_seed(1, 5, 0) == step_seed(1, 5, 0)
    seeds = {step_seed(1, s, w) for s in range(50) for w in range(4)}
    assert len(seeds) == 200
    assert all(0 <= s < 2**63 for s in seeds)
