"""benchmarks.limits: the single-core compute limit of the paper's CNN (``bench cnn``)."""

from __future__ import annotations

import math

import torch

from benchmarks.limits import cnn_step_rate


def test_cnn_step_rate_is_a_finite_rate_on_one_thread_and_restores_the_thread_count():
    threads = torch.get_num_threads()
    rate = cnn_step_rate(batch=4, steps=3)
    assert math.isfinite(rate) and rate > 0
    assert torch.get_num_threads() == threads
