"""Unit tests for ftmpi.sampler (no MPI)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ftmpi.sampler import (
    ShardedBatches,
    batch_indices,
    epoch_of,
    epoch_permutation,
    steps_per_epoch,
)

N, B, W, SEED = 103, 4, 3, 7
SPE = N // (B * W)  # 8 full steps per epoch, remainder 7 samples


def indices(step: int, worker: int, *, seed: int = SEED) -> np.ndarray:
    return batch_indices(N, B, step=step, worker=worker, workers=W, seed=seed)


def test_shape_dtype_and_range() -> None:
    idx = indices(0, 0)
    assert idx.dtype == np.int64 and idx.shape == (B,)
    assert idx.min() >= 0 and idx.max() < N


def test_matches_documented_formula() -> None:
    step = SPE + 3  # epoch 1, step 3 within the epoch
    perm = np.random.Generator(np.random.PCG64([SEED, 1])).permutation(N)
    start = 3 * B * W + 2 * B
    np.testing.assert_array_equal(indices(step, 2), perm[start : start + B])


def test_workers_of_one_step_are_disjoint() -> None:
    for step in range(3 * SPE):
        batches = [set(indices(step, w).tolist()) for w in range(W)]
        assert sum(len(b) for b in batches) == B * W
        assert len(set().union(*batches)) == B * W


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_epoch_covers_each_index_exactly_once(epoch: int) -> None:
    used = np.concatenate([indices(epoch * SPE + s, w) for s in range(SPE) for w in range(W)])
    assert used.size == SPE * B * W
    assert np.unique(used).size == used.size  # no index used twice
    perm = epoch_permutation(N, seed=SEED, epoch=epoch)
    remainder = set(perm[SPE * B * W :].tolist())
    assert len(remainder) == N - SPE * B * W
    assert set(used.tolist()) | remainder == set(range(N))
    assert not set(used.tolist()) & remainder


def test_pure_function_of_arguments() -> None:
    a = indices(11, 1)
    a[:] = -1  # returned arrays are copies; mutating one must not affect later calls
    np.testing.assert_array_equal(
        indices(11, 1), batch_indices(N, B, step=11, worker=1, workers=W, seed=SEED)
    )
    assert indices(11, 1).min() >= 0
    assert not np.array_equal(indices(11, 1, seed=SEED), indices(11, 1, seed=SEED + 1))


def test_different_epochs_use_different_permutations() -> None:
    perms = [epoch_permutation(N, seed=SEED, epoch=e) for e in range(4)]
    for p, q in itertools.combinations(perms, 2):
        assert not np.array_equal(p, q)
    # Same step-within-epoch and worker in different epochs gives different batches.
    assert not np.array_equal(indices(2, 0), indices(SPE + 2, 0))


def test_epoch_permutation_is_read_only() -> None:
    perm = epoch_permutation(N, seed=SEED, epoch=0)
    with pytest.raises(ValueError):
        perm[0] = 1


def test_epoch_of_and_steps_per_epoch() -> None:
    assert steps_per_epoch(N, B, W) == SPE
    assert epoch_of(0, N, B, W) == 0
    assert epoch_of(SPE - 1, N, B, W) == 0
    assert epoch_of(SPE, N, B, W) == 1
    assert epoch_of(5 * SPE + 2, N, B, W) == 5


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_samples": 10, "batch_size": 4, "workers": 3}, r"smaller than one global batch"),
        ({"batch_size": 0}, r"batch_size must be >= 1"),
        ({"workers": 0}, r"workers must be >= 1"),
        ({"worker": 3}, r"worker must be in \[0, 3\)"),
        ({"worker": -1}, r"worker must be in \[0, 3\)"),
        ({"step": -1}, r"step must be >= 0"),
        ({"seed": -2}, r"seed must be >= 0"),
        ({"num_samples": 0}, r"num_samples must be >= 1"),
    ],
)
def test_batch_indices_validation(kwargs: dict[str, int], pattern: str) -> None:
    args = {"num_samples": N, "batch_size": B, "step": 0, "worker": 0, "workers": W, "seed": SEED}
    args.update(kwargs)
    num_samples = args.pop("num_samples")
    batch_size = args.pop("batch_size")
    with pytest.raises(ValueError, match=pattern):
        batch_indices(num_samples, batch_size, **args)


# ---------------------------------------------------------------------------------------------
# ShardedBatches
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(N, dtype=torch.float32).reshape(N, 1, 1, 1).expand(N, 1, 2, 2).contiguous()
    y = torch.arange(N, dtype=torch.int64)
    return x, y


def take(it: ShardedBatches, n: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    return list(itertools.islice(it, n))


def test_sharded_batches_match_batch_indices(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    it = ShardedBatches(x, y, B, worker=1, workers=W, seed=SEED)
    assert it.step == 0
    for expected_step, (step, xb, yb) in enumerate(take(it, 3 * SPE + 2)):
        assert step == expected_step
        idx = indices(step, 1)
        np.testing.assert_array_equal(yb.numpy(), idx)
        assert torch.equal(xb, x[torch.from_numpy(idx)])
    assert it.step == 3 * SPE + 2
    assert it.epoch == 3


def test_sharded_batches_resume_reproduces_sequence(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = data
    total, cut = 4 * SPE + 3, SPE + 5
    reference = take(ShardedBatches(x, y, B, worker=2, workers=W, seed=SEED), total)

    first = ShardedBatches(x, y, B, worker=2, workers=W, seed=SEED)
    head = take(first, cut)
    state = first.state_dict()
    assert state["step"] == cut

    resumed = ShardedBatches(x, y, B, worker=2, workers=W, seed=SEED)
    resumed.load_state_dict(dict(state))
    assert resumed.step == cut
    tail = take(resumed, total - cut)

    assert [s for s, _, _ in head + tail] == list(range(total))
    for (s1, x1, y1), (s2, x2, y2) in zip(reference, head + tail, strict=True):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2)

    started = ShardedBatches(x, y, B, worker=2, workers=W, seed=SEED, start_step=cut)
    for (s1, _, y1), (s2, _, y2) in zip(reference[cut:], take(started, total - cut), strict=True):
        assert s1 == s2 and torch.equal(y1, y2)


def test_sharded_batches_workers_disjoint(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    iters = [ShardedBatches(x, y, B, worker=w, workers=W, seed=SEED) for w in range(W)]
    for _ in range(SPE):
        ys = [next(it)[2] for it in iters]
        assert torch.unique(torch.cat(ys)).numel() == B * W


def test_load_state_dict_rejects_mismatch(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    it = ShardedBatches(x, y, B, worker=0, workers=W, seed=SEED)
    state = ShardedBatches(x, y, B, worker=0, workers=W, seed=SEED + 1, start_step=9).state_dict()
    with pytest.raises(ValueError, match=r"seed: saved 8, current 7"):
        it.load_state_dict(state)
    assert it.step == 0  # unchanged on error

    other = ShardedBatches(x, y, 2, worker=0, workers=2, seed=SEED).state_dict()
    with pytest.raises(ValueError, match=r"batch_size: saved 2, current 4.*workers: saved 2"):
        it.load_state_dict(other)

    bad = it.state_dict()
    del bad["num_samples"]
    with pytest.raises(ValueError, match="missing key"):
        it.load_state_dict(bad)

    negative = it.state_dict() | {"step": -1}
    with pytest.raises(ValueError, match="step must be >= 0"):
        it.load_state_dict(negative)


def test_load_state_dict_accepts_other_worker(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    state = ShardedBatches(x, y, B, worker=0, workers=W, seed=SEED, start_step=5).state_dict()
    it = ShardedBatches(x, y, B, worker=1, workers=W, seed=SEED)
    it.load_state_dict(state)
    step, _, yb = next(it)
    assert step == 5
    np.testing.assert_array_equal(yb.numpy(), indices(5, 1))


def test_sharded_batches_validation(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = data
    with pytest.raises(ValueError, match="x has 103 samples but y has 102"):
        ShardedBatches(x, y[:-1], B, worker=0, workers=W, seed=SEED)
    with pytest.raises(ValueError, match=r"worker must be in \[0, 3\)"):
        ShardedBatches(x, y, B, worker=3, workers=W, seed=SEED)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ShardedBatches(x, y, 0, worker=0, workers=W, seed=SEED)
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        ShardedBatches(x, y, B, worker=0, workers=W, seed=SEED, start_step=-1)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        ShardedBatches(x, y, 64, worker=0, workers=W, seed=SEED)
