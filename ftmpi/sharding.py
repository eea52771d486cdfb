"""Division of a model's parameters into shards, one shard per parameter server.

A shard is a set of whole parameter tensors (their optimizer state goes with them), laid out
contiguously in one flat buffer. The plan is a pure function of the parameters' names, shapes and
order, so every worker computes the same plan without talking to anyone, and a replacement server
can be told its shard by index.

Balance: parameters are assigned largest first to the currently lightest shard (LPT), which keeps
the heaviest shard within one tensor of the mean. A single tensor is never split, so a model with
one dominant tensor cannot be balanced across more servers than it has comparable tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Slot:
    """One parameter inside a shard's flat buffer (offsets in elements)."""

    name: str
    group: int
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Shard:
    """One server's share: parameters in model order, occupying ``[start, start+numel)`` of the
    workers' model-wide flat buffer."""

    index: int
    start: int
    slots: tuple[Slot, ...]

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "start": self.start,
            "slots": [[s.name, s.group, list(s.shape), s.offset] for s in self.slots],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Shard:
        """The shard :meth:`to_json` describes (its JSON form read back)."""
        slots = tuple(
            Slot(str(n), int(g), tuple(int(x) for x in shape), int(off))
            for n, g, shape, off in d["slots"]
        )
        return cls(int(d["index"]), int(d["start"]), slots)


@dataclass(frozen=True)
class ParamInfo:
    """What the plan needs to know of one parameter."""

    name: str
    group: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def plan_shards(params: Sequence[ParamInfo], num_shards: int) -> list[Shard]:
    """Assign every parameter to exactly one of ``num_shards`` shards, balanced by size.

    Shards are laid out one after another in a model-wide flat buffer (shard 0 first); inside a
    shard, parameters keep model order. Raises ``ValueError`` for duplicate names, no
    parameters, or more shards than parameters (a server would hold nothing).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names must be unique; duplicated: {dup}")
    if not params:
        raise ValueError("the optimizer has no parameters to shard")
    if num_shards > len(params):
        raise ValueError(
            f"{num_shards} servers but the model has only {len(params)} parameter tensors; "
            f"use at most {len(params)} servers (a tensor is never split across servers)"
        )
    load = [0] * num_shards
    owner: dict[int, int] = {}
    by_size = sorted(range(len(params)), key=lambda i: (-params[i].numel, i))
    for i in by_size:
        s = min(range(num_shards), key=lambda k: (load[k], k))
        owner[i] = s
        load[s] += params[i].numel
    shards = []
    start = 0
    for s in range(num_shards):
        slots = []
        offset = 0
        for i, p in enumerate(params):
            if owner[i] == s:
                slots.append(Slot(p.name, p.group, p.shape, offset))
                offset += p.numel
        shards.append(Shard(s, start, tuple(slots)))
        start += offset
    return shards
