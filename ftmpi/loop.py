"""The training position ftmpi owns, and a loop that rewinds it (in the spirit of Horovod
Elastic's ``State`` + ``run``).

With the ``checkpoint`` strategy a server failure rolls the model back to a snapshot. The
weights roll back inside ``optimizer.step()``; the *loop* must rewind too, or the steps since the
snapshot would be skipped instead of replayed. Wrap the loop in :func:`run`::

    state = ftmpi.TrainingState(optimizer, batches)     # batches: ftmpi.sampler.ShardedBatches

    @ftmpi.run
    def train(state):
        for step, x, y in state.batches:               # resumes at state.batches.step
            if step >= total_steps:
                return
            ...
            state.optimizer.step()

    train(state)

On a rollback, ``step()`` raises :class:`Rollback` inside ``run``; ``run`` moves
``state.batches`` to the rolled-back position and calls the function again. A plain ``for step in
range(...)`` loop is not rewound: its weights roll back, its counter does not, and ftmpi warns
once at the first rollback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from ftmpi.repro import seed_step

T = TypeVar("T")


class Rollback(Exception):
    """Raised by ``step()`` inside :func:`run` after the model was rolled back to ``position``."""

    def __init__(self, position: int) -> None:
        super().__init__(f"rolled back to step {position}")
        self.position = position


class TrainingState:
    """The objects ftmpi rewinds on a rollback: the optimizer's position and the batches.

    With ``reseed=True`` (the default) and batches that take an ``on_step`` hook
    (:class:`ftmpi.sampler.ShardedBatches`), every batch reseeds torch, numpy and ``random``
    from ``(batches.seed, step, batches.worker)`` before it is returned (:func:`ftmpi.seed_step`),
    so dropout masks and other draws of a step are the same after a rollback, resume or replay.
    """

    def __init__(
        self, optimizer: Any, batches: Any = None, *, reseed: bool = True, **extra: Any
    ) -> None:
        self.optimizer = optimizer
        self.batches = batches
        self.rollbacks = 0
        self.reseed = bool(reseed and batches is not None and hasattr(batches, "on_step"))
        if self.reseed:
            batches.on_step = functools.partial(seed_step, seed=batches.seed, worker=batches.worker)
        self.__dict__.update(extra)
        position = getattr(optimizer, "position", 0)
        if batches is not None and position:  # a resumed run starts where its snapshot was
            batches.step = position

    def rewind(self, position: int) -> None:
        """Move the data position to ``position`` (the optimizer is already there)."""
        self.rollbacks += 1
        if self.batches is not None:
            self.batches.step = position


def run(func: Callable[..., T]) -> Callable[..., T]:
    """Run ``func(state, ...)``; after a rollback, rewind ``state`` and run it again."""

    @functools.wraps(func)
    def wrapper(state: TrainingState, *args: Any, **kwargs: Any) -> T:
        opt = state.optimizer
        opt._ftmpi_in_run = True
        try:
            while True:
                try:
                    return func(state, *args, **kwargs)
                except Rollback as rb:
                    state.rewind(rb.position)
        finally:
            opt._ftmpi_in_run = False

    return wrapper
