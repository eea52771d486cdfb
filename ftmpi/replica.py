"""One server's replica of its shard: weights, optimizer, version, and the updates applied.

The weights are a flat buffer; the ``torch`` parameters are views into it, so a reply sends the
buffer with no copy, and the optimizer is the worker's optimizer class run on the same tensors a
single process would hold: identical inputs give bit-identical results. Every replica of a chain
applies the same :class:`Update` s in the same order, so replicas hold bit-identical state.

Nothing here talks to other ranks; the request loop (``ftmpi.server``) receives into
:meth:`ShardReplica.grad_bytes`, applies with :meth:`ShardReplica.apply` and sends
:meth:`ShardReplica.weights_bytes` and :meth:`ShardReplica.state`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ftmpi import failpoints
from ftmpi.optim_state import (
    apply_hparams,
    build_optimizer,
    dtype_of,
    group_hparams,
    load_state_entries,
    pack_tensors,
    payload_nbytes,
    state_entries,
    tensor_segments,
    unpack_tensors,
)
from ftmpi.sharding import Shard


@dataclass
class Update:
    """One applied push, as forwarded down a chain."""

    version: int
    """The shard's version after this update."""
    src: int
    """World rank of the worker that pushed it (current view)."""
    seq: int
    """The worker's sequence number (its data position)."""
    hparams: list[dict[str, Any]] | None
    """Param-group hyper-parameters that took effect just before this update, if they changed."""
    grad: np.ndarray = field(repr=False)
    """The gradient's bytes."""
    count: int = 1
    """Gradients this update stands for (a replayed log folds many into one)."""
    lr_scale: float = 1.0
    """Factor applied to the learning rate for this update only."""
    replay: bool = False
    """Whether this update is a replayed gradient log."""

    @property
    def base(self) -> int:
        """The version this update applies to."""
        return self.version - self.count

    def meta(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "src": self.src,
            "seq": self.seq,
            "hparams": self.hparams,
            "count": self.count,
            "lr_scale": self.lr_scale,
            "replay": self.replay,
        }


def weights_nbytes(spec: dict[str, Any]) -> int:
    """Bytes of the weights at the start of a state payload described by ``spec``."""
    return int(Shard.from_json(spec["shard"]).numel * dtype_of(spec["dtype"]).itemsize)


class ShardReplica:
    """A shard's state on one server: empty until :meth:`build`, then updated by :meth:`apply`."""

    def __init__(self) -> None:
        self.shard: Shard | None = None
        self.weights: torch.Tensor | None = None
        self.grads: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: dict[str, torch.Tensor] = {}
        self.spec: dict[str, Any] = {}
        """Layout, optimizer class, hyper-parameters and dtype it was built from (empty before)."""
        self.version = 0
        self.applied = 0
        """Gradients applied (a replayed log counts every gradient in it)."""
        self.replayed = 0
        """Gradients applied from workers' logs (``stateless``)."""
        self.apply_seconds = 0.0
        self.positions: dict[int, int] = {}
        """World rank of a worker -> its data position after its last applied push."""
        self.last_seq: dict[int, int] = {}
        """World rank of a worker -> sequence number of its last applied push (async dedup)."""

    @property
    def has_state(self) -> bool:
        """Whether the shard's state is here (built from the workers, a peer or a snapshot)."""
        return self.grads is not None

    def build(self, spec: dict[str, Any], binary: np.ndarray, *, version: int) -> None:
        """(Re)create the shard's tensors and optimizer from ``spec`` and ``binary`` (weights,
        then the optimizer state laid out by ``spec["state_table"]``). A writable ``binary``
        becomes the shard's memory (no copy); the caller must not reuse it. Raises what the
        optimizer class raises for a spec it cannot load; the old state is then kept."""
        shard = Shard.from_json(spec["shard"])
        dtype = dtype_of(spec["dtype"])
        wbytes = weights_nbytes(spec)
        weights_np = binary[:wbytes] if binary.flags.writeable else binary[:wbytes].copy()
        weights = torch.from_numpy(weights_np).view(dtype)
        grads = torch.zeros_like(weights)
        params: dict[str, torch.Tensor] = {}
        by_group: list[list[torch.Tensor]] = [[] for _ in spec["groups"]]
        for slot in shard.slots:
            view = weights[slot.offset : slot.offset + slot.numel].view(slot.shape)
            p = torch.nn.Parameter(view)
            p.grad = grads[slot.offset : slot.offset + slot.numel].view(slot.shape)
            params[slot.name] = p
            by_group[slot.group].append(p)
        optimizer = build_optimizer(spec["optimizer"], spec["groups"], by_group)
        state = unpack_tensors(spec.get("state_table", []), binary[wbytes:], copy=False)
        load_state_entries(optimizer, params, state, spec.get("state_scalars", {}))
        self.weights, self.grads, self.optimizer, self.params = weights, grads, optimizer, params
        self.shard = shard
        self.spec = {k: spec[k] for k in ("shard", "optimizer", "groups", "dtype")}
        self.version = version

    def adopt(self, spec: dict[str, Any], binary: np.ndarray, version: int) -> None:
        """:meth:`build` from a whole state received from a worker or a peer, with the workers'
        last sequence numbers and (a chain's ``REPLICATE``) the sender's counters."""
        self.build(spec, binary, version=version)
        self.last_seq = {int(r): q for r, q in spec.get("last_seq", {}).items()}
        if "counters" in spec:
            self.applied = int(spec["counters"]["applied"])
            self.replayed = int(spec["counters"]["replayed"])

    def weights_bytes(self) -> np.ndarray:
        """The weights as an array sharing their memory (valid until the next update)."""
        assert self.weights is not None
        return self.weights.numpy()

    def grad_bytes(self) -> np.ndarray:
        """The optimizer's gradient buffer as an array sharing its memory: a gradient received
        here is applied with ``apply(..., loaded=True)`` without a copy."""
        assert self.grads is not None
        return self.grads.numpy()

    def state(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The shard's whole state: a JSON-able spec (layout, optimizer, current
        hyper-parameters, state table) and the bytes it describes as segments (weights, then
        each optimizer-state tensor), views of the live tensors: valid until the next update."""
        assert self.optimizer is not None and self.weights is not None
        tensors, scalars = state_entries(self.optimizer, {p: n for n, p in self.params.items()})
        table, views = tensor_segments(tensors)
        spec = {
            **self.spec,
            "groups": [group_hparams(g) for g in self.optimizer.param_groups],
            "state_table": table,
            "state_scalars": scalars,
        }
        return spec, [self.weights_bytes(), *views]

    def state_nbytes(self) -> int:
        """Bytes of the shard's whole state (:meth:`state`'s segments)."""
        return payload_nbytes(self.state()[1])

    def optimizer_state(self) -> tuple[dict[str, Any], np.ndarray]:
        """The optimizer state packed into one buffer: ``(doc, bytes)``, ``doc`` holding the
        tensor table, the JSON scalars and the buffer's size."""
        assert self.optimizer is not None
        tensors, scalars = state_entries(self.optimizer, {p: n for n, p in self.params.items()})
        table, buf = pack_tensors(tensors)
        return {"table": table, "scalars": scalars, "binary_nbytes": int(buf.nbytes)}, buf

    def set_hparams(self, groups: list[dict[str, Any]]) -> bool:
        """Apply param-group hyper-parameters now; False (ignored) before the state exists."""
        if self.optimizer is None:
            return False
        apply_hparams(self.optimizer, groups)
        return True

    def apply(self, u: Update, *, loaded: bool = False) -> None:
        """Apply one update (a gradient and the hyper-parameters in force for it); the version
        becomes ``u.version``. ``loaded``: the gradient buffer already holds ``u``'s gradient
        (it was received there), so it is not copied in again."""
        assert self.optimizer is not None and self.grads is not None
        grad_bytes = self.grads.numpy().view(np.uint8).reshape(-1)
        if not loaded and u.grad.ctypes.data != grad_bytes.ctypes.data:
            grad_bytes[:] = u.grad.view(np.uint8).reshape(-1)
        if u.hparams is not None:
            apply_hparams(self.optimizer, u.hparams)
        lrs: list[Any] = [g.get("lr") for g in self.optimizer.param_groups]
        if u.lr_scale != 1.0:
            for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr * u.lr_scale
        t0 = time.perf_counter()
        self.optimizer.step()
        self.apply_seconds += time.perf_counter() - t0
        if u.lr_scale != 1.0:
            for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
        self.version = u.version
        failpoints.failpoint("apply")
        self.applied += u.count
        if u.replay:
            self.replayed += u.count
        if u.src >= 0:
            self.positions[u.src] = u.seq + 1
            self.last_seq[u.src] = u.seq

    def renumber(self, remap: dict[int, int]) -> None:
        """Keep per-worker bookkeeping under the ranks of a shrunk world."""
        self.positions = {remap[r]: p for r, p in self.positions.items() if r in remap}
        self.last_seq = {remap[r]: q for r, q in self.last_seq.items() if r in remap}
