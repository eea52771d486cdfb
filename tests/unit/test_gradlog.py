"""The stateless gradient log: one running sum per shard, whatever the outage's length."""

import pytest
import torch

from ftmpi.gradlog import SUM_SCALED_THRESHOLD, GradientLog


def make(policy, n=2):
    return GradientLog(0, n, torch.float32, policy)


def fill(log, grads, first_step=10):
    for i, g in enumerate(grads):
        log.append(torch.tensor(g, dtype=torch.float32), seq=first_step + i, step=first_step + i)


GRADS = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]


def stored_sum(grads, weights):
    """What summing the stored gradients at replay gave: zeros, then each in logging order."""
    total = torch.zeros(len(grads[0]))
    for w, g in zip(weights, grads, strict=True):
        total.add_(torch.tensor(g), alpha=w)
    return total


def test_sum_scaled_and_mean_give_the_bits_of_summing_the_stored_gradients():
    log = make("sum-scaled")
    fill(log, GRADS)
    s = log.combine()
    assert torch.equal(s.grad, stored_sum(GRADS, [1.0] * 3))
    assert (s.count, s.first_seq, s.last_seq, s.lr_scale, s.max_age) == (3, 10, 12, 1.0, 2)
    log = make("mean")
    fill(log, GRADS)
    assert torch.equal(log.combine().grad, stored_sum(GRADS, [1.0] * 3) / 3)


def test_staleness_weighted_weights_each_gradient_by_its_age_in_the_outage():
    log = make("staleness-weighted")
    fill(log, GRADS)
    # ages 0, 1, 2 (steps since the first logged gradient) -> weights 1, 1/2, 1/3
    w = [1.0, 1 / 2, 1 / 3]
    want = [sum(wi * g[j] for wi, g in zip(w, GRADS, strict=True)) / sum(w) for j in range(2)]
    assert log.combine().grad.tolist() == pytest.approx(want, rel=1e-6)


def test_memory_is_one_buffer_however_many_gradients():
    log = make("sum-scaled", n=1000)
    assert log.memory_bytes == 0
    for step in range(500):
        log.append(torch.ones(1000), seq=step, step=step)
    assert log.memory_bytes == 1000 * 4 and len(log) == 500
    assert log.combine().grad.tolist() == [500.0] * 1000


def test_sum_scaled_lowers_the_lr_past_the_papers_threshold():
    log = make("sum-scaled", n=1)
    fill(log, [[1.0]] * SUM_SCALED_THRESHOLD)
    assert log.combine().lr_scale == 1.0
    fill(log, [[1.0]], first_step=100)
    assert log.combine().lr_scale == pytest.approx(0.1)


def test_the_log_copies_the_gradient_and_is_kept_until_cleared():
    log = make("mean")
    g = torch.tensor([1.0, 1.0])
    log.append(g, seq=0, step=0)
    g.fill_(7.0)
    assert log.combine().grad.tolist() == [1.0, 1.0]
    assert log.combine().grad.tolist() == [1.0, 1.0]  # a replay cut short is sent again
    log.clear()
    assert len(log) == 0 and log.memory_bytes == 0 and log.last_seq == -1


def test_an_empty_log_cannot_be_combined_and_a_policy_is_checked():
    with pytest.raises(ValueError, match="empty"):
        make("mean").combine()
    with pytest.raises(ValueError, match="unknown stale_policy 'median'"):
        make("median")
