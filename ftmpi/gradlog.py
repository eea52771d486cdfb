"""The gradient log a worker keeps for a shard whose server is down (``stateless``).

Each entry is one gradient for the shard, with the worker's sequence number (its data position),
the shard version it was computed on and the step at which it was computed. Entries live in
memory up to ``memory_cap`` bytes, then in an append-only file under ``spill_dir`` up to
``disk_cap`` bytes; past both, :meth:`GradientLog.append` raises :class:`GradientLogFull`
naming the settings to change. The file holds raw tensor bytes only (nothing is unpickled).

:meth:`GradientLog.combine` folds the entries into the one gradient a replacement server applies,
under a policy (DESIGN.md section 4):

- ``sum-scaled`` (the paper's): the sum of all entries; the server applies it at a tenth of the
  learning rate when more than 50 are pending;
- ``mean``: their mean;
- ``staleness-weighted``: ``sum(w_i g_i) / sum(w_i)`` with ``w_i = 1 / (1 + age_i)``, where
  ``age_i`` is how many steps before the replay entry ``i`` was computed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import torch

SUM_SCALED_THRESHOLD = 50
"""``sum-scaled``: above this many pending gradients the learning rate is scaled down..."""
SUM_SCALED_FACTOR = 0.1
"""...by this factor (the paper: lr 1e-2 -> 1e-3 with more than 50 pending)."""


class GradientLogFull(RuntimeError):
    """The log reached its memory and disk caps."""


@dataclass(frozen=True)
class Entry:
    seq: int
    base_version: int
    step: int
    offset: int
    """Byte offset in the spill file, or -1 when the tensor is in memory."""


@dataclass(frozen=True)
class Combined:
    """What a replay sends: one gradient standing for ``count`` logged ones."""

    grad: torch.Tensor
    count: int
    first_seq: int
    last_seq: int
    lr_scale: float
    max_age: int


class GradientLog:
    """Gradients of one shard logged while its server is down; see the module docstring."""

    def __init__(
        self,
        shard: int,
        numel: int,
        dtype: torch.dtype,
        *,
        memory_cap: int,
        spill_dir: str = "",
        disk_cap: int = 0,
    ) -> None:
        self.shard = shard
        self.numel = numel
        self.dtype = dtype
        self.memory_cap = memory_cap
        self.spill_dir = spill_dir
        self.disk_cap = disk_cap
        self.entries: list[Entry] = []
        self._memory: list[torch.Tensor] = []
        self._file: str | None = None
        self._disk_bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def entry_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def memory_bytes(self) -> int:
        return len(self._memory) * self.entry_bytes

    @property
    def disk_bytes(self) -> int:
        return self._disk_bytes

    def append(self, grad: torch.Tensor, *, seq: int, base_version: int, step: int) -> None:
        """Log a copy of ``grad``. Raises :class:`GradientLogFull` when both caps are reached."""
        if self.memory_bytes + self.entry_bytes <= self.memory_cap:
            self._memory.append(grad.detach().clone())
            self.entries.append(Entry(seq, base_version, step, -1))
            return
        if not self.spill_dir or self._disk_bytes + self.entry_bytes > self.disk_cap:
            where = (
                f"and its disk part in {self.spill_dir} ({self._disk_bytes} of "
                f"stale_log_disk_bytes={self.disk_cap})"
                if self.spill_dir
                else "(no stale_log_dir to spill to)"
            )
            raise GradientLogFull(
                f"the gradient log of shard {self.shard} is full after {len(self)} gradients: "
                f"memory {self.memory_bytes} of stale_log_bytes={self.memory_cap} {where}; "
                "raise FTMPI_STALE_LOG_BYTES, set FTMPI_STALE_LOG_DIR, or bound the log with "
                "FTMPI_MAX_STALENESS so workers wait for the replacement"
            )
        if self._file is None:
            os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
            fd, self._file = tempfile.mkstemp(
                prefix=f"gradlog-shard{self.shard:03d}-", suffix=".bin", dir=self.spill_dir
            )
            os.close(fd)
        with open(self._file, "ab") as f:
            offset = f.tell()
            f.write(grad.detach().contiguous().numpy().tobytes())
        self._disk_bytes += self.entry_bytes
        self.entries.append(Entry(seq, base_version, step, offset))

    def _tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        memory = iter(self._memory)
        for e in self.entries:
            if e.offset < 0:
                out.append(next(memory))
                continue
            assert self._file is not None
            with open(self._file, "rb") as f:
                f.seek(e.offset)
                raw = bytearray(f.read(self.entry_bytes))
            out.append(torch.frombuffer(raw, dtype=self.dtype))
        return out

    def combine(self, policy: str, now_step: int) -> Combined:
        """Fold every entry into one gradient under ``policy`` (see the module docstring)."""
        if not self.entries:
            raise ValueError(f"the gradient log of shard {self.shard} is empty")
        total = torch.zeros(self.numel, dtype=self.dtype)
        ages = [now_step - e.step for e in self.entries]
        weights = [1.0] * len(ages)
        if policy == "staleness-weighted":
            weights = [1.0 / (1 + a) for a in ages]
        for w, t in zip(weights, self._tensors(), strict=True):
            total.add_(t.view(-1), alpha=w)
        n = len(self.entries)
        lr_scale = 1.0
        if policy == "mean":
            total.div_(n)
        elif policy == "staleness-weighted":
            total.div_(sum(weights))
        elif policy == "sum-scaled":
            lr_scale = SUM_SCALED_FACTOR if n > SUM_SCALED_THRESHOLD else 1.0
        else:
            raise ValueError(f"unknown stale_policy {policy!r}")
        return Combined(total, n, self.entries[0].seq, self.entries[-1].seq, lr_scale, max(ages))

    def clear(self) -> None:
        """Forget every entry (after the replay was acknowledged); removes the spill file."""
        self.entries = []
        self._memory = []
        if self._file is not None:
            os.unlink(self._file)
            self._file = None
        self._disk_bytes = 0
