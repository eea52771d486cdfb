"""The stateless gradient log: policies, memory/disk caps, spill file."""

import os

import pytest
import torch

from ftmpi.gradlog import SUM_SCALED_THRESHOLD, GradientLog, GradientLogFull


def make(n=4, **kw):
    kw.setdefault("memory_cap", 1 << 20)
    return GradientLog(0, n, torch.float32, **kw)


def fill(log, grads):
    for i, g in enumerate(grads):
        log.append(torch.tensor(g, dtype=torch.float32), seq=10 + i, base_version=5, step=10 + i)


def test_policies_fold_exactly():
    grads = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    log = make(2)
    fill(log, grads)
    s = log.combine("sum-scaled", now_step=13)
    assert s.grad.tolist() == [9.0, 12.0] and s.count == 3 and s.lr_scale == 1.0
    assert (s.first_seq, s.last_seq, s.max_age) == (10, 12, 3)
    assert log.combine("mean", 13).grad.tolist() == [3.0, 4.0]
    # ages 3, 2, 1 -> weights 1/4, 1/3, 1/2
    w = [1 / 4, 1 / 3, 1 / 2]
    want = [sum(wi * g[j] for wi, g in zip(w, grads, strict=True)) / sum(w) for j in range(2)]
    got = log.combine("staleness-weighted", 13).grad.tolist()
    assert got == pytest.approx(want, rel=1e-6)


def test_sum_scaled_lowers_the_lr_past_the_papers_threshold():
    log = make(1)
    fill(log, [[1.0]] * SUM_SCALED_THRESHOLD)
    assert log.combine("sum-scaled", 100).lr_scale == 1.0
    fill(log, [[1.0]])
    assert log.combine("sum-scaled", 100).lr_scale == pytest.approx(0.1)


def test_log_copies_the_gradient():
    log = make(2)
    g = torch.tensor([1.0, 1.0])
    log.append(g, seq=0, base_version=0, step=0)
    g.fill_(7.0)
    assert log.combine("mean", 1).grad.tolist() == [1.0, 1.0]


def test_full_memory_without_spill_is_a_clear_error():
    log = make(4, memory_cap=32)  # two entries of 16 bytes
    fill(log, [[1.0] * 4] * 2)
    with pytest.raises(GradientLogFull, match=r"FTMPI_STALE_LOG_BYTES.*FTMPI_MAX_STALENESS"):
        fill(log, [[1.0] * 4])
    assert len(log) == 2  # nothing half-logged


def test_spill_to_disk_then_cap(tmp_path):
    log = make(4, memory_cap=16, spill_dir=str(tmp_path / "spill"), disk_cap=32)
    fill(log, [[1.0] * 4, [2.0] * 4, [3.0] * 4])  # one in memory, two on disk
    assert log.memory_bytes == 16 and log.disk_bytes == 32
    files = os.listdir(tmp_path / "spill")
    assert len(files) == 1 and os.path.getsize(tmp_path / "spill" / files[0]) == 32
    assert log.combine("sum-scaled", 3).grad.tolist() == [6.0] * 4
    with pytest.raises(GradientLogFull, match="stale_log_disk_bytes=32"):
        fill(log, [[4.0] * 4])
    log.clear()
    assert len(log) == 0 and os.listdir(tmp_path / "spill") == []


def test_empty_log_cannot_be_combined():
    with pytest.raises(ValueError, match="empty"):
        make().combine("mean", 0)
