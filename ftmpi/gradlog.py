"""What a worker keeps of a shard's gradients while the shard's server is down (``stateless``).

Every policy a replacement applies is a weighted sum of the logged gradients whose weights are
known when each gradient is logged, so the log keeps one running sum per shard, plus counters:
its memory is one gradient buffer whatever the outage's length (a 20 s outage of the paper's
CNN logged 3.25 MB per step before; the sum stays at 3.25 MB). Policies (DESIGN.md section 4):

- ``sum-scaled`` (the paper's): the sum of all gradients; the server applies it at a tenth of
  the learning rate when more than 50 are pending;
- ``mean``: their mean;
- ``staleness-weighted``: ``sum(w_i g_i) / sum(w_i)`` with ``w_i = 1 / (1 + age_i)``, where
  ``age_i`` is how many steps the shard's weights had been frozen when gradient ``i`` was
  computed (its step minus the step of the outage's first logged gradient): the later in the
  outage, the staler the weights it was computed on.

The sum is accumulated in logging order from zeros, the same additions the sum of stored
gradients would make at replay, so ``sum-scaled`` and ``mean`` give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUM_SCALED_THRESHOLD = 50
"""``sum-scaled``: above this many pending gradients the learning rate is scaled down..."""
SUM_SCALED_FACTOR = 0.1
"""...by this factor (the paper: lr 1e-2 -> 1e-3 with more than 50 pending)."""
POLICIES = ("sum-scaled", "mean", "staleness-weighted")


@dataclass(frozen=True)
class Combined:
    """What a replay sends: one gradient standing for ``count`` logged ones."""

    grad: torch.Tensor
    count: int
    first_seq: int
    last_seq: int
    lr_scale: float
    max_age: int
    """The largest ``age_i`` (steps the shard's weights were frozen), for the server's record."""


class GradientLog:
    """The running sum of one shard's gradients logged while its server is down."""

    def __init__(self, shard: int, numel: int, dtype: torch.dtype, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown stale_policy {policy!r}; choose from {POLICIES}")
        self.shard = shard
        self.numel = numel
        self.dtype = dtype
        self.policy = policy
        self.count = 0
        self.first_seq = -1
        self.last_seq = -1
        """Sequence number (data position) of the first and the last logged gradient."""
        self._first_step = 0
        self._last_step = 0
        self._weights = 0.0
        self._sum: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.count

    @property
    def memory_bytes(self) -> int:
        """Bytes held: the running sum (allocated at the first gradient, freed by :meth:`clear`)."""
        return 0 if self._sum is None else self._sum.numel() * self._sum.element_size()

    def append(self, grad: torch.Tensor, *, seq: int, step: int) -> None:
        """Add ``grad`` (computed at ``step``, data position ``seq``) to the running sum."""
        if self._sum is None:
            self._sum = torch.zeros(self.numel, dtype=self.dtype)
            self.first_seq, self._first_step = seq, step
        weight = 1.0
        if self.policy == "staleness-weighted":
            weight = 1.0 / (1 + step - self._first_step)
        self._sum.add_(grad.detach().reshape(-1), alpha=weight)
        self._weights += weight
        self.count += 1
        self.last_seq, self._last_step = seq, step

    def combine(self) -> Combined:
        """The one gradient a replacement applies under the policy (the log is kept: a replay
        cut short is sent again). ``sum-scaled`` returns the running sum itself (not a copy);
        ``mean`` and ``staleness-weighted`` a scaled copy."""
        if self._sum is None:
            raise ValueError(f"the gradient log of shard {self.shard} is empty")
        grad, lr_scale = self._sum, 1.0
        if self.policy == "mean":
            grad = self._sum / self.count
        elif self.policy == "staleness-weighted":
            grad = self._sum / self._weights
        elif self.count > SUM_SCALED_THRESHOLD:
            lr_scale = SUM_SCALED_FACTOR
        return Combined(
            grad,
            self.count,
            self.first_seq,
            self.last_seq,
            lr_scale,
            self._last_step - self._first_step,
        )

    def clear(self) -> None:
        """Forget every gradient (after the replay was acknowledged and pulled)."""
        self._sum = None
        self.count = 0
        self.first_seq = self.last_seq = -1
        self._weights = 0.0
