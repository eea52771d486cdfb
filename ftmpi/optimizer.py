"""``ftmpi.DistributedOptimizer``: the worker-side optimizer, shaped like Horovod's.

The result is an instance of a subclass of the user's optimizer class (as with
``hvd.DistributedOptimizer``), so ``isinstance`` checks, LR schedulers and ``zero_grad`` work
unchanged. Its ``step()``:

- sync mode: averages gradients among workers (collective backend), then the worker that leads
  each shard pushes that shard's averaged gradient to its server; the server applies the
  optimizer and replies with the new weights, which the leader broadcasts to the other workers.
  Server traffic per step is one model's worth of gradients in and weights out, whatever the
  number of workers.
- async mode: no collective. The worker pushes its own gradient to every server and continues
  with the weights each server returns; staleness is recorded by the servers.
- no servers (``servers=0``): plain data parallelism; averaged gradients, local optimizer step.

The first ``step()`` initialises the servers from worker 0's parameters and optimizer state.
Every step either completes on every worker or raises on a worker (``CommTimeout``,
``PeerFailure``, ``RemoteError``); it never waits forever.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ftmpi.client import ServerClient
from ftmpi.optim_state import class_path, group_hparams, pack_tensors, state_entries
from ftmpi.runtime import Runtime, runtime
from ftmpi.sharding import ParamInfo, Shard, plan_shards


class ReduceOp(enum.Enum):
    """Gradient reduction among workers (``hvd.Average`` / ``hvd.Sum``)."""

    Average = "average"
    Sum = "sum"


Average = ReduceOp.Average
Sum = ReduceOp.Sum


class _DistributedOptimizer(torch.optim.Optimizer):
    """Mixed into a subclass of the user's optimizer class by :func:`DistributedOptimizer`."""

    def __init__(
        self,
        params: Any,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
        op: ReduceOp,
        gradient_predivide_factor: float,
        base_class: type[torch.optim.Optimizer],
    ) -> None:
        super(self.__class__, self).__init__(params)  # type: ignore[misc]
        rt = runtime()
        self._ftmpi_rt: Runtime = rt
        self._ftmpi_base_class = base_class
        self._ftmpi_op = op
        self._ftmpi_predivide = float(gradient_predivide_factor)
        self._ftmpi_names = _parameter_names(self.param_groups, named_parameters)
        self._ftmpi_params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        dtypes = {p.dtype for p in self._ftmpi_params}
        if len(dtypes) != 1:
            raise TypeError(
                f"all parameters must share one dtype; found {sorted(map(str, dtypes))}"
            )
        infos = [
            ParamInfo(self._ftmpi_names[p], gi, tuple(p.shape))
            for gi, g in enumerate(self.param_groups)
            for p in g["params"]
        ]
        self._ftmpi_shards: list[Shard] = plan_shards(infos, max(rt.num_servers, 1))
        self._ftmpi_client = ServerClient(rt, self._ftmpi_shards, dtypes.pop())
        by_name = {self._ftmpi_names[p]: p for p in self._ftmpi_params}
        # (param, its slice of the flat gradient buffer, its slice of the flat weight buffer)
        self._ftmpi_slots = [
            (
                by_name[slot.name],
                self._ftmpi_client.grads[shard.start + slot.offset :][: slot.numel].view(
                    slot.shape
                ),
                self._ftmpi_client.weights[shard.start + slot.offset :][: slot.numel].view(
                    slot.shape
                ),
            )
            for shard in self._ftmpi_shards
            for slot in shard.slots
        ]
        self._ftmpi_started = False
        self._ftmpi_synchronized = False
        self._ftmpi_should_sync = True

    # ---------------------------------------------------------- Horovod API

    def synchronize(self) -> None:
        """Average gradients among workers now (sync mode) and write them to ``p.grad``.

        Use with :meth:`skip_synchronize` to modify averaged gradients (e.g. clip them) before
        ``step()``, as with Horovod. A no-op in async mode.
        """
        if self._ftmpi_rt.config.mode == "async":
            return
        self._gather_grads()
        self._allreduce()
        for p, g, _ in self._ftmpi_slots:
            if p.grad is None:
                p.grad = g.detach().clone().to(p.device)
            else:
                p.grad.copy_(g)
        self._ftmpi_synchronized = True

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Within this block ``step()`` does not average again (call :meth:`synchronize` first)."""
        self._ftmpi_should_sync = False
        try:
            yield
        finally:
            self._ftmpi_should_sync = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """One training step on every worker; see the module docstring for what it guarantees."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rt = self._ftmpi_rt
        if rt.config.mode == "async":
            self._gather_grads()
            self._start_servers()
            self._push_pull(self._ftmpi_shards)
            return loss
        if self._ftmpi_should_sync and not self._ftmpi_synchronized:
            self._gather_grads()
            self._allreduce()
        elif self._ftmpi_synchronized:
            self._gather_grads()  # the user may have changed the averaged gradients
        self._ftmpi_synchronized = False
        if rt.num_servers == 0:
            for p, g, _ in self._ftmpi_slots:
                if p.grad is not None:
                    p.grad.copy_(g)
            return super(self.__class__, self).step()  # type: ignore[misc]
        self._start_servers()
        me, workers = rt.role_rank, rt.num_workers
        self._push_pull([s for s in self._ftmpi_shards if s.index % workers == me])
        assert rt.backend is not None
        for shard in self._ftmpi_shards:
            rt.backend.broadcast_(
                self._ftmpi_client.view(self._ftmpi_client.weights, shard),
                root=shard.index % workers,
            )
        self._scatter_weights()
        return loss

    # ------------------------------------------------------------ ftmpi API

    def server_stats(self) -> list[dict[str, Any]]:
        """Counters from every server (updates applied, staleness, dropped messages)."""
        if not self._ftmpi_started:
            return []
        return self._ftmpi_client.stats()

    @torch.no_grad()
    def pull(self) -> None:
        """Load the servers' current weights into the model (e.g. before evaluating in async
        mode, where this worker's copy may lag)."""
        if self._ftmpi_started:
            self._ftmpi_client.pull(self._ftmpi_shards)
            self._scatter_weights()

    @property
    def shards(self) -> list[Shard]:
        """The shard plan: which parameters each server owns."""
        return list(self._ftmpi_shards)

    # ------------------------------------------------------------- internals

    def _gather_grads(self) -> None:
        for p, g, _ in self._ftmpi_slots:
            if p.grad is None:
                g.zero_()
            else:
                g.copy_(p.grad)

    def _allreduce(self) -> None:
        backend = self._ftmpi_rt.backend
        assert backend is not None
        grads = self._ftmpi_client.grads
        average = self._ftmpi_op is ReduceOp.Average
        if average and self._ftmpi_predivide != 1.0:
            grads.div_(self._ftmpi_predivide)
            backend.allreduce_(grads, average=False)
            grads.mul_(self._ftmpi_predivide).div_(backend.size())
        else:
            backend.allreduce_(grads, average=average)

    def _push_pull(self, shards: list[Shard]) -> None:
        client = self._ftmpi_client
        client.send_hparams(shards, [group_hparams(g) for g in self.param_groups])
        client.push_pull(shards)
        if self._ftmpi_rt.config.mode == "async":
            self._scatter_weights()

    def _scatter_weights(self) -> None:
        for p, _, w in self._ftmpi_slots:
            p.copy_(w)

    def _start_servers(self) -> None:
        """First step only: worker 0 sends layout, weights and state; all workers then wait."""
        if self._ftmpi_started:
            return
        rt = self._ftmpi_rt
        if rt.role_rank == 0:
            for p, _, w in self._ftmpi_slots:
                w.copy_(p.detach())
            self._ftmpi_client.init_servers(
                class_path(self._ftmpi_base_class),
                [group_hparams(g) for g in self.param_groups],
                self._state_by_shard(),
            )
        assert rt.backend is not None
        rt.backend.barrier()
        self._ftmpi_started = True

    def _state_by_shard(self) -> dict[int, tuple[list[dict[str, Any]], np.ndarray, dict[str, Any]]]:
        tensors, scalars = state_entries(self, self._ftmpi_names)
        out = {}
        for shard in self._ftmpi_shards:
            names = {slot.name for slot in shard.slots}
            mine = [(k, t) for k, t in tensors if k.rpartition("/")[0] in names]
            table, buf = pack_tensors(mine)
            out[shard.index] = (
                table,
                buf,
                {k: v for k, v in scalars.items() if k.rpartition("/")[0] in names},
            )
        return out


def _parameter_names(
    groups: list[dict[str, Any]], named_parameters: Iterable[tuple[str, torch.Tensor]] | None
) -> dict[torch.Tensor, str]:
    """Map every optimized parameter to a unique name (Horovod's naming when none are given)."""
    params = [p for g in groups for p in g["params"]]
    if named_parameters is None:
        return {p: f"param.{i}" for i, p in enumerate(params)}
    named = list(named_parameters)
    names: dict[torch.Tensor, str] = {}
    for name, p in named:
        if p in names and names[p] != name:
            continue  # shared parameter: keep the first name
        names[p] = name
    all_names = list(names.values())
    dups = sorted({n for n in all_names if all_names.count(n) > 1})
    if dups:
        raise ValueError(f"named_parameters contains duplicate names: {dups}")
    missing = [i for i, p in enumerate(params) if p not in names]
    if missing:
        raise ValueError(
            f"named_parameters does not name {len(missing)} optimized parameter(s) "
            f"(positions {missing[:5]}); pass model.named_parameters() for the model the "
            "optimizer was built on"
        )
    return {p: names[p] for p in params}


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    op: ReduceOp = Average,
    gradient_predivide_factor: float = 1.0,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` goes through ftmpi's servers (see module docstring).

    Call :func:`ftmpi.init` first. The returned object is an instance of a subclass of
    ``type(optimizer)`` over the same param groups. Raises ``ValueError``/``TypeError`` for
    unnamed or mixed-dtype parameters before any communication.
    """
    if not isinstance(op, ReduceOp):
        raise ValueError(f"op={op!r} is not supported; use ftmpi.Average or ftmpi.Sum")
    if gradient_predivide_factor != 1.0 and op is not Average:
        raise ValueError("gradient_predivide_factor is only meaningful with op=ftmpi.Average")
    base = type(optimizer)
    cls = type(base.__name__, (base,), dict(_DistributedOptimizer.__dict__))
    opt = cls(optimizer.param_groups, named_parameters, op, gradient_predivide_factor, base)
    if optimizer.state:
        opt.load_state_dict(optimizer.state_dict())
    return opt
