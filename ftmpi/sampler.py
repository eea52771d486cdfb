"""Deterministic, restart-safe data order for data-parallel workers.

The sample indices a worker uses at a global step are a pure function of
``(seed, epoch, step, worker)`` (plus the sizes ``num_samples``, ``batch_size`` and ``workers``),
so a worker that restarts from a checkpointed step sees exactly the batches it would have seen
without the failure, and a replacement worker can take over another worker's shard.

Layout (``B`` = batch size per worker, ``W`` = number of workers)::

    steps_per_epoch = num_samples // (B * W)          # the remainder of each epoch is skipped
    epoch           = step // steps_per_epoch
    perm            = Generator(PCG64([seed, epoch])).permutation(num_samples)
    s               = step % steps_per_epoch
    global batch    = perm[s * B * W : (s + 1) * B * W]
    worker w        = global batch[w * B : (w + 1) * B]

Guarantees: within one step the workers' index sets are disjoint; within one epoch every index
of ``perm[: steps_per_epoch * B * W]`` is used exactly once; different epochs use independently
drawn permutations. The same arguments always give the same indices (numpy guarantees the PCG64
bit stream; ``permutation`` is stable across numpy versions in practice).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch

__all__ = [
    "ShardedBatches",
    "batch_indices",
    "epoch_of",
    "epoch_permutation",
    "steps_per_epoch",
]

_STATE_VERSION = 1


def _check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, or raise ValueError if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_worker(worker: object, workers: int) -> int:
    """Validate ``worker`` against an already validated ``workers``."""
    if isinstance(worker, bool) or not isinstance(worker, (int, np.integer)):
        raise ValueError(f"worker must be an integer, got {worker!r}")
    if not 0 <= worker < workers:
        raise ValueError(f"worker must be in [0, {workers}) for workers={workers}, got {worker}")
    return int(worker)


def steps_per_epoch(num_samples: int, batch_size: int, workers: int) -> int:
    """Number of full global batches per epoch: ``num_samples // (batch_size * workers)``.

    Raises:
        ValueError: If an argument is not a positive integer, or the result is 0 (the dataset is
            smaller than one global batch); the message says how to fix it.
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    workers = _check_int("workers", workers, 1)
    spe = num_samples // (batch_size * workers)
    if spe == 0:
        raise ValueError(
            f"num_samples={num_samples} is smaller than one global batch "
            f"(batch_size={batch_size} x workers={workers} = {batch_size * workers}); "
            "use a smaller batch size, fewer workers or more data"
        )
    return spe


def epoch_of(step: int, num_samples: int, batch_size: int, workers: int) -> int:
    """Return the epoch that global step ``step`` (>= 0) falls in.

    Raises:
        ValueError: On invalid arguments (see :func:`steps_per_epoch`) or a negative step.
    """
    step = _check_int("step", step, 0)
    return step // steps_per_epoch(num_samples, batch_size, workers)


@lru_cache(maxsize=8)
def _cached_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_samples)
    perm = perm.astype(np.int64, copy=False)
    perm.flags.writeable = False
    return perm


def epoch_permutation(num_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    """Return the epoch's permutation of ``range(num_samples)`` as a read-only int64 array.

    It is ``Generator(PCG64([seed, epoch])).permutation(num_samples)``; recent results are
    cached, which is why the array is read-only (copy it before modifying).

    Raises:
        ValueError: If ``num_samples < 1``, ``seed < 0`` or ``epoch < 0``.
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    seed = _check_int("seed", seed, 0)
    epoch = _check_int("epoch", epoch, 0)
    return _cached_permutation(num_samples, seed, epoch)


def batch_indices(
    num_samples: int, batch_size: int, *, step: int, worker: int, workers: int, seed: int
) -> np.ndarray:
    """Return the ``batch_size`` sample indices of ``worker`` at global step ``step``.

    A pure function of its arguments (see the module docstring for the layout). The returned
    int64 array is a fresh, writable copy.

    Raises:
        ValueError: If ``num_samples``, ``batch_size`` or ``workers`` is < 1, ``step`` or ``seed``
            is negative, ``worker`` is outside ``[0, workers)``, or the dataset holds fewer than
            ``batch_size * workers`` samples.
    """
    spe = steps_per_epoch(num_samples, batch_size, workers)
    batch_size, workers = int(batch_size), int(workers)
    worker = _check_worker(worker, workers)
    step = _check_int("step", step, 0)
    epoch, within = divmod(step, spe)
    perm = epoch_permutation(num_samples, seed=seed, epoch=epoch)
    start = (within * workers + worker) * batch_size
    return perm[start : start + batch_size].copy()


class ShardedBatches:
    """Infinite iterator of ``(step, x, y)`` batches for one worker.

    Batch ``step`` holds ``x[batch_indices(len(x), batch_size, step=step, ...)]`` and the matching
    labels, so the sequence depends only on the constructor arguments and the starting step. The
    iterator never stops; the caller bounds it. ``step`` is the next step to be produced.

    Resuming: ``state_dict()`` records the position (``step``) and the layout parameters;
    ``load_state_dict()`` restores the position after checking that the layout matches, so a
    resumed iterator produces exactly the batches an uninterrupted one would have. The worker
    index is recorded but not required to match: a replacement process may take over a shard.
    To deliberately change the layout (e.g. a different number of workers), construct a new
    instance with ``start_step`` instead.

    ``on_step``, if set, is called with each step just before its batch is returned;
    :class:`ftmpi.TrainingState` sets it to reseed the RNGs for that step (:mod:`ftmpi.repro`).

    Raises:
        ValueError: On construction, for mismatched ``x``/``y`` lengths or invalid arguments
            (see :func:`batch_indices`).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        worker: int,
        workers: int,
        seed: int,
        start_step: int = 0,
    ) -> None:
        if x.dim() < 1 or y.dim() < 1:
            raise ValueError("x and y must have a leading sample dimension")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}; they must match")
        self.num_samples = int(x.shape[0])
        self.steps_per_epoch = steps_per_epoch(self.num_samples, batch_size, workers)
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self.worker = _check_worker(worker, self.workers)
        self.seed = _check_int("seed", seed, 0)
        self.step = _check_int("start_step", start_step, 0)
        self.x = x
        self.y = y
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None
        self.on_step: Callable[[int], object] | None = None

    @property
    def epoch(self) -> int:
        """Epoch of the next step to be produced."""
        return self.step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch or self._perm is None:
            perm = epoch_permutation(self.num_samples, seed=self.seed, epoch=epoch)
            self._perm = torch.from_numpy(perm.copy())
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """Return this worker's int64 sample indices for ``step`` (does not move the position).

        Equal to ``batch_indices(...)`` for the same arguments.
        """
        step = _check_int("step", step, 0)
        epoch, within = divmod(step, self.steps_per_epoch)
        start = (within * self.workers + self.worker) * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        step = self.step
        idx = self.indices(step)
        self.step = step + 1
        if self.on_step is not None:
            self.on_step(step)
        return step, self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        """Return the position and layout as a dict of plain ints (safe to pickle or JSON)."""
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "worker": self.worker,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position from :meth:`state_dict` output.

        Raises:
            ValueError: If a key is missing, the step is invalid, or ``seed``, ``batch_size``,
                ``workers`` or ``num_samples`` differ from this instance's (the message lists
                each mismatch). The instance is left unchanged on error.
        """
        required = ("step", "seed", "batch_size", "workers", "num_samples")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"sampler state is missing key(s) {missing}; got keys {sorted(state)}")
        version = state.get("version", _STATE_VERSION)
        if version != _STATE_VERSION:
            raise ValueError(
                f"unsupported sampler state version {version!r}, expected {_STATE_VERSION}"
            )
        mismatches = [
            f"{key}: saved {state[key]!r}, current {getattr(self, key)!r}"
            for key in ("seed", "batch_size", "workers", "num_samples")
            if state[key] != getattr(self, key)
        ]
        if mismatches:
            raise ValueError(
                "sampler state does not match this data layout ("
                + "; ".join(mismatches)
                + "); construct ShardedBatches with the saved parameters, or with start_step to "
                "deliberately change the layout"
            )
        self.step = _check_int("step", state["step"], 0)

    def __repr__(self) -> str:
        return (
            f"ShardedBatches(step={self.step}, worker={self.worker}, workers={self.workers}, "
            f"batch_size={self.batch_size}, seed={self.seed}, num_samples={self.num_samples})"
        )


def step_seed(seed: int, step: int, worker: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, worker): reseeding the RNG with it
    before each step makes dropout masks replay exactly after a rollback or restart."""
    mixed = np.random.SeedSequence([seed, step, worker]).generate_state(2, dtype=np.uint32)
    return int(mixed[0]) << 31 ^ int(mixed[1])
