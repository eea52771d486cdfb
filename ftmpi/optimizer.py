"""``ftmpi.DistributedOptimizer``: the worker-side optimizer, shaped like Horovod's.

The result is an instance of a subclass of the user's optimizer class (as with
``hvd.DistributedOptimizer``), so ``isinstance`` checks, LR schedulers and ``zero_grad`` work
unchanged. Its ``step()``:

- sync mode: averages gradients among workers (collective backend), then the worker that leads
  each shard pushes that shard's averaged gradient to its server; the server applies the
  optimizer and replies with the new weights, which the leader broadcasts to the other workers.
  Server traffic per step is one model's worth of gradients in and weights out, whatever the
  number of workers.
- sync mode, ``mirror`` placement: averages gradients among workers and steps this worker's
  own optimizer on them, exactly as plain Horovod does; then each shard's leader sends the
  averaged gradient to the shard's servers without waiting for the answer (unless the mirror
  falls ``mirror_lag`` updates behind), and the servers apply it to a mirror of the state.
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
import importlib.util
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from ftmpi import record
from ftmpi.buckets import GradientBuckets, gather_grad
from ftmpi.client import ServerClient
from ftmpi.collective import PendingReduce
from ftmpi.compression import Compression, Compressor, changes_dtype
from ftmpi.fatal import UserError
from ftmpi.faults import Injector, parse_schedule
from ftmpi.mirror import Mirror
from ftmpi.optim_state import (
    class_path,
    group_hparams,
    load_state_entries,
    state_entries,
    tensor_segments,
)
from ftmpi.runtime import Runtime, runtime
from ftmpi.sharding import ParamInfo, Shard, plan_shards
from ftmpi.timing import PhaseTimes
from ftmpi.wire import PeerFailure
from ftmpi.worker_recovery import WorkerRecovery


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
        compression: Compressor,
        backward_passes_per_step: int,
        op: ReduceOp,
        gradient_predivide_factor: float,
        sparse_as_dense: bool,
        base_class: type[torch.optim.Optimizer],
    ) -> None:
        super(self.__class__, self).__init__(params)  # type: ignore[call-arg]
        rt = runtime()
        self._ftmpi_rt: Runtime = rt
        self._ftmpi_base_class = base_class
        self._ftmpi_op = op
        self._ftmpi_predivide = float(gradient_predivide_factor)
        self._ftmpi_compression = compression
        self._ftmpi_sparse_as_dense = sparse_as_dense
        self.backward_passes_per_step = backward_passes_per_step
        self._ftmpi_names = _parameter_names(self.param_groups, named_parameters)
        self._ftmpi_params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        dtypes = {p.dtype for p in self._ftmpi_params}
        if len(dtypes) != 1:
            raise UserError(
                f"all parameters must share one dtype; found {sorted(map(str, dtypes))}: "
                "convert the model to one (e.g. model.float()) before wrapping its optimizer"
            )
        backend_name = rt.backend.name if rt.backend else "none"
        if backend_name != "horovod" and changes_dtype(compression, next(iter(dtypes))):
            raise ValueError(
                f"compression={getattr(compression, '__name__', compression)} needs the Horovod "
                f"backend; this run uses {backend_name!r} (install Horovod with "
                "scripts/install-horovod.sh, or use Compression.none)"
            )
        infos = [
            ParamInfo(self._ftmpi_names[p], gi, tuple(p.shape))
            for gi, g in enumerate(self.param_groups)
            for p in g["params"]
        ]
        self._ftmpi_shards: list[Shard] = plan_shards(infos, max(rt.num_shards, 1))
        self._ftmpi_cuda = any(p.is_cuda for p in self._ftmpi_params)
        self._ftmpi_client = client = ServerClient(rt, self._ftmpi_shards, dtypes.pop())
        if self._ftmpi_cuda:  # page-locked: a model on a GPU copies in and out asynchronously
            client.grads, client.weights = client.grads.pin_memory(), client.weights.pin_memory()
        by_name = {self._ftmpi_names[p]: p for p in self._ftmpi_params}
        # (param, its offset in the flat buffers, its element count), in the buffers' order
        self._ftmpi_spans = [
            (by_name[slot.name], shard.start + slot.offset, slot.numel)
            for shard in self._ftmpi_shards
            for slot in shard.slots
        ]
        # (param, its slice of the flat gradient buffer, its slice of the flat weight buffer)
        self._ftmpi_slots = [
            (p, client.grads[at : at + n].view(p.shape), client.weights[at : at + n].view(p.shape))
            for p, at, n in self._ftmpi_spans
        ]
        with torch.no_grad():
            for p, _, w in self._ftmpi_slots:
                w.copy_(p)
                if p.device.type == "cpu" and rt.num_servers:
                    p.data = w  # the model's parameter now lives in the weight buffer: no copy
        self._ftmpi_started = False
        self._ftmpi_position = 0
        self._ftmpi_in_run = False
        self._ftmpi_injector = Injector(
            parse_schedule(rt.config.kill),
            "worker",
            rt.role_rank,
            int(rt.late_joiner),  # a replacement carries out the next kill of its index
            rt.job_start,
            run_dir=rt.config.run_dir,
        )
        self._ftmpi_times = PhaseTimes()
        self._ftmpi_synchronized = False
        self._ftmpi_should_sync = True
        self._ftmpi_local_grads: torch.Tensor | None = None
        """This worker's own gradient as :meth:`synchronize` found it, before reducing it."""
        self._ftmpi_mirror = Mirror(rt, self._ftmpi_client) if rt.config.mirrored else None
        self._ftmpi_buckets = _overlap_buckets(self)
        self._ftmpi_recovery = WorkerRecovery(
            rt, self._ftmpi_client, self, base_class, self._ftmpi_times, self._ftmpi_mirror
        )
        self._ftmpi_recovery.start()  # a replacement joins; a resumed run loads its snapshot
        record.track(self)  # its steps and weights go into the run's summary.json

    # ---------------------------------------------------------- Horovod API

    def synchronize(self) -> None:
        """Average gradients among workers now (sync mode) and write them to ``p.grad``.

        Use with :meth:`skip_synchronize` to modify averaged gradients (e.g. clip them) before
        ``step()``, as with Horovod; ``step()`` then applies ``p.grad`` as it finds it, without
        reducing it again. A no-op in async mode. Raises ``PeerFailure``/``CommTimeout`` if a
        worker dies or stops answering (call ``step()``, which recovers, or end the job).

        If the step that follows is retried after a recovery that changed the set of workers,
        this worker's own gradient (kept here) is reduced again over the new workers, as a
        replacement's is: changes made to ``p.grad`` after this call are not in that retry.
        After a recovery that only replaced servers, the retry applies ``p.grad`` unchanged.
        """
        if self._ftmpi_rt.config.mode == "async":
            return
        if self._ftmpi_local_grads is None:
            self._ftmpi_local_grads = torch.empty_like(self._ftmpi_client.grads)
        self._gather_grads(self._ftmpi_local_grads)  # hooks have filled the flat buffer
        if self._ftmpi_buckets is None:
            self._ftmpi_client.grads.copy_(self._ftmpi_local_grads)
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
        """One training step on every worker; see the module docstring for what it guarantees.

        A rank death during the step is recovered (:class:`ftmpi.worker_recovery.WorkerRecovery`)
        and the step retried, or dropped after a rollback (raising :class:`ftmpi.Rollback`
        inside :func:`ftmpi.run`); the recovery's errors propagate."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ftmpi_injector.at_step(self._ftmpi_position + 1)
        recovery = self._ftmpi_recovery
        buckets = self._ftmpi_buckets
        checked = buckets is not None and buckets.checked  # at the first gradient: see there
        if self._ftmpi_rt.checkpoint_requested and not checked:
            recovery.checkpoint_on_signal()
        synced = self._ftmpi_synchronized  # synchronize() reduced p.grad: never reduce it again
        allreduce = not synced and (self._ftmpi_should_sync or self._ftmpi_rt.num_servers == 0)
        allreduce = allreduce or (buckets is not None and buckets.started)  # begun in backward
        local: torch.Tensor | None = None
        base = list(self._ftmpi_client.versions)
        while True:
            try:
                self._data_path(allreduce=allreduce, local=local)
                break
            except PeerFailure as exc:
                if buckets is not None:  # started in backward or in the attempt: all again
                    buckets.abandon()
                retry = recovery.recover_step(str(exc), base)
                if retry is None:
                    return loss  # rolled back outside ftmpi.run: this step is dropped
                base = retry.base
                if not synced:
                    allreduce = True
                elif retry.workers_changed:  # p.grad holds a reduction over other workers
                    local, allreduce = self._ftmpi_local_grads, True
        recovery.step_completed()
        self._ftmpi_synchronized = False
        self._ftmpi_position += 1
        self._ftmpi_client.position = self._ftmpi_position
        if self._ftmpi_mirror is not None:
            self._ftmpi_mirror.after_step(self, self._ftmpi_recovery.recover_after_step)
        return loss

    def _data_path(self, *, allreduce: bool, local: torch.Tensor | None = None) -> None:
        """One attempt at the step's communication, on the gradients in ``p.grad`` (or on
        ``local``, this worker's own, when given); raises ``PeerFailure`` on a rank death."""
        rt = self._ftmpi_rt
        t = self._ftmpi_times
        recovery = self._ftmpi_recovery
        t.steps += 1
        if self._ftmpi_buckets is None or not self._ftmpi_buckets.checked:
            recovery.before_attempt()  # else checked at the first gradient (ftmpi.buckets)
        with t.phase("gather"):
            if local is not None:
                self._ftmpi_client.grads.copy_(local)
            elif not (allreduce and self._ftmpi_buckets is not None):  # else the buckets do
                self._gather_grads()
        if rt.config.mode == "async":
            self._start_servers()
            live = recovery.live_shards(self._ftmpi_shards)
            with t.phase("push_pull"):
                self._ftmpi_client.repush(live)
                self._push_pull(live)
            return
        if allreduce:
            with t.phase("allreduce"):
                self._allreduce(gathered=local is not None)
        if rt.num_servers == 0 or rt.config.mirrored:
            with t.phase("local_step"):
                for p, g, _ in self._ftmpi_slots:
                    if p.grad is not None:
                        p.grad.copy_(g)
                super(self.__class__, self).step()
            return
        self._start_servers()
        live = recovery.live_shards(self._ftmpi_shards)
        with t.phase("push_pull_broadcast"):
            mine = recovery.live_shards(self._my_shards())
            self._ftmpi_client.repush(mine)
            self._ftmpi_client.send_hparams(mine, self._hparams())
            self._ftmpi_client.push_pull_broadcast(rt.group, rt.num_workers, rt.role_rank, live)
        with t.phase("scatter"):
            self._scatter_weights()

    # ------------------------------------------------------------ ftmpi API

    def step_times(self) -> dict[str, float]:
        """Mean milliseconds per step spent in each phase of ``step()`` on this worker."""
        return self._ftmpi_times.per_step_ms()

    def stale_stats(self) -> dict[str, int]:
        """``stateless``: gradients this worker logged while a shard had no server, and how many
        of them replacements have acknowledged."""
        return self._ftmpi_recovery.stale_stats()

    def server_stats(self, *, wait: bool = True) -> list[dict[str, Any]]:
        """Counters from every shard's server (updates applied, staleness, dropped messages).

        ``stateless``: by default this waits until every shard has a server again and its log
        is replayed, so the counters cover every gradient computed so far. ``wait=False`` (a
        progress report during training) never waits: a shard that has no server now is left
        out, and the worker trains on."""
        if not self._ftmpi_started:
            return []
        surviving = self._ftmpi_recovery.surviving
        if self._ftmpi_mirror is not None:
            surviving(self._ftmpi_mirror.drain)
        if wait:
            return surviving(self._ftmpi_client.stats)
        rt = self._ftmpi_rt
        return surviving(
            lambda: self._ftmpi_client.stats(
                [s for s in self._ftmpi_shards if rt.live_chain(s.index)]
            ),
            settle=False,
        )

    @torch.no_grad()
    def pull(self) -> None:
        """Load the servers' current weights into the model (e.g. before evaluating in async
        mode, where this worker's copy may lag). In ``mirror`` placement the workers hold the
        newest weights: nothing to do."""
        if self._ftmpi_started and not self._ftmpi_rt.config.mirrored:
            self._ftmpi_recovery.surviving(lambda: self._ftmpi_client.pull(self._ftmpi_shards))
            self._scatter_weights()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as ``torch.optim.Optimizer.state_dict()`` returns it.

        Once training has started the servers own the state, so this fetches it from them
        (collective-free: any worker may call it) and returns it in the usual layout, ready
        for ``torch.save`` and a later ``load_state_dict``. In ``mirror`` placement the worker's
        own state is returned.
        """
        rt = self._ftmpi_rt
        if self._ftmpi_started and rt.num_servers and not rt.config.mirrored:
            self._ftmpi_recovery.surviving(self._load_servers_state)
        return super(self.__class__, self).state_dict()

    def _load_servers_state(self) -> None:
        """Replace this optimizer's state with the servers' (raises ``PeerFailure`` if one
        dies meanwhile)."""
        by_name = {self._ftmpi_names[p]: p for p in self._ftmpi_params}
        fetched = self._ftmpi_client.fetch_state()
        self.state.clear()
        for tensors, scalars in fetched:
            load_state_entries(self, by_name, tensors, scalars)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; the servers receive it (with the model's current weights from
        worker 0) at the next ``step()``. Call it on every worker, as with any optimizer."""
        super(self.__class__, self).load_state_dict(state_dict)
        self._ftmpi_started = False

    @property
    def position(self) -> int:
        """Steps this optimizer has completed: the data position ftmpi rewinds on a rollback."""
        return self._ftmpi_position

    @position.setter
    def position(self, value: int) -> None:
        self._ftmpi_position = self._ftmpi_client.position = int(value)

    @property
    def parameters_by_name(self) -> dict[str, torch.Tensor]:
        """Every optimized parameter by its name (``named_parameters``' names, else Horovod's
        ``param.N``): a new dict of the live tensors."""
        return {name: p for p, name in self._ftmpi_names.items()}

    @property
    def shards(self) -> list[Shard]:
        """The shard plan: which parameters each server owns."""
        return list(self._ftmpi_shards)

    # ------------------------------------------------------------- internals

    def _gather_grads(self, into: torch.Tensor | None = None) -> None:
        """Copy every parameter's gradient into the flat gradient buffer (or ``into``)."""
        views = (
            ((p, g) for p, g, _ in self._ftmpi_slots)  # the step's path: views made once
            if into is None
            else ((p, into[at : at + n].view(p.shape)) for p, at, n in self._ftmpi_spans)
        )
        cuda = self._ftmpi_cuda  # into page-locked memory
        for p, g in views:
            name = self._ftmpi_names[p]
            gather_grad(p, g, name, sparse_as_dense=self._ftmpi_sparse_as_dense, cuda=cuda)
        if self._ftmpi_cuda:
            torch.cuda.current_stream().synchronize()  # every copy is in before MPI reads it

    def _before_communication(self) -> bool:
        """A step's first gradient (``overlap``), before anything of the step is sent: the
        fault injector's step, a snapshot SIGUSR1 asked for (of the last completed step, so no
        push of this one may reach a server first), then whether the step will recover before
        it communicates (then no bucket starts in backward). What is asked after this waits
        for the next step."""
        self._ftmpi_injector.at_step(self._ftmpi_position + 1)
        if self._ftmpi_rt.checkpoint_requested:
            self._ftmpi_recovery.checkpoint_on_signal()
        return self._ftmpi_recovery.attempt_will_recover()

    def _start_reduce(self, t: torch.Tensor, name: str) -> PendingReduce:
        backend = self._ftmpi_rt.backend
        assert backend is not None
        average = self._ftmpi_op is ReduceOp.Average
        return backend.start_allreduce_(
            t, average=average, predivide=self._ftmpi_predivide, name=name
        )

    def _allreduce(self, *, gathered: bool = False) -> None:
        """Average the flat gradient buffer across workers (by buckets with ``overlap``;
        ``gathered``: the caller filled it, no hook's copy counts)."""
        if self._ftmpi_buckets is not None:
            self._ftmpi_buckets.reduce(gathered=gathered)
            return
        backend = self._ftmpi_rt.backend
        assert backend is not None
        grads = self._ftmpi_client.grads
        average = self._ftmpi_op is ReduceOp.Average
        wire_grads, ctx = self._ftmpi_compression.compress(grads)
        backend.allreduce_(wire_grads, average=average, predivide=self._ftmpi_predivide)
        if wire_grads is not grads:
            grads.copy_(self._ftmpi_compression.decompress(wire_grads, ctx))

    def _hparams(self) -> list[dict[str, Any]]:
        return [group_hparams(g) for g in self.param_groups]

    def _my_shards(self) -> list[Shard]:
        rt = self._ftmpi_rt
        return [s for s in self._ftmpi_shards if s.index % rt.num_workers == rt.role_rank]

    def _push_pull(self, shards: list[Shard]) -> None:
        client = self._ftmpi_client
        client.send_hparams(shards, self._hparams())
        client.push_pull(shards)
        self._scatter_weights()

    def _scatter_weights(self) -> None:
        for p, _, w in self._ftmpi_slots:
            if p.data_ptr() != w.data_ptr():  # parameters not aliasing the weight buffer
                p.copy_(w)

    def _params_to_buffer(self) -> None:
        """Copy the parameters into the client's flat weight buffer (the reverse of
        :meth:`_scatter_weights`)."""
        with torch.no_grad():
            for p, _, w in self._ftmpi_slots:
                if p.data_ptr() != w.data_ptr():
                    w.copy_(p.detach())

    def _start_servers(self) -> None:
        """First step only: worker 0 sends layout, weights and state; all workers then wait."""
        if self._ftmpi_started:
            return
        rt = self._ftmpi_rt
        if rt.role_rank == 0:
            self._params_to_buffer()
            self._ftmpi_client.init_servers(
                class_path(self._ftmpi_base_class),
                [group_hparams(g) for g in self.param_groups],
                _state_by_shard(self, self._ftmpi_names, self._ftmpi_shards),
                # a shard whose servers died before training started gets its state when a
                # replacement is rebuilt from the workers (stateless)
                [s for s in self._ftmpi_shards if rt.live_chain(s.index)],
            )
        assert rt.backend is not None
        rt.backend.barrier()
        self._ftmpi_started = True


def _overlap_buckets(opt: _DistributedOptimizer) -> GradientBuckets | None:
    """The gradient buckets averaged during backward (``overlap``, sync mode), or None."""
    rt = opt._ftmpi_rt
    if not rt.config.overlap or rt.config.mode != "sync" or rt.backend is None:
        return None
    by_param = {p: (at, n) for p, at, n in opt._ftmpi_spans}
    return GradientBuckets(
        opt._ftmpi_client.grads,
        [(p, *by_param[p]) for p in opt._ftmpi_params],  # backward's order, reversed
        opt._ftmpi_names,
        bucket_bytes=rt.config.bucket_bytes,
        passes=opt.backward_passes_per_step,
        start=opt._start_reduce,
        first=opt._before_communication,
        progress=opt._ftmpi_mirror.progress if opt._ftmpi_mirror else lambda: None,
        compression=opt._ftmpi_compression,
        sparse_as_dense=opt._ftmpi_sparse_as_dense,
    )


def _state_by_shard(
    opt: torch.optim.Optimizer, names: dict[torch.Tensor, str], shards: list[Shard]
) -> dict[int, tuple[list[dict[str, Any]], list[np.ndarray], dict[str, Any]]]:
    """Each shard's optimizer state: table, byte views of the live tensors, scalars."""
    tensors, scalars = state_entries(opt, names)
    out = {}
    for shard in shards:
        mine = {slot.name for slot in shard.slots}
        table, buf = tensor_segments([(k, t) for k, t in tensors if k.rpartition("/")[0] in mine])
        out[shard.index] = (
            table,
            buf,
            {k: v for k, v in scalars.items() if k.rpartition("/")[0] in mine},
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


def _reduce_op(op: Any) -> ReduceOp:
    """ftmpi's ReduceOp for ``op`` (ftmpi's own, or Horovod's ``hvd.Average``/``hvd.Sum``)."""
    if isinstance(op, ReduceOp):
        return op
    name = repr(op)
    if importlib.util.find_spec("horovod") is not None:
        import horovod.torch as hvd

        for supported in ("Average", "Sum"):
            if op == getattr(hvd, supported):
                return ReduceOp[supported]
        name = next(
            (f"hvd.{n}" for n in _HOROVOD_OPS if getattr(hvd, n, None) == op and op is not None),
            repr(op),
        )
    raise ValueError(
        f"op={name} is not supported; use Average or Sum (Adasum, Min, Max and Product do not "
        "fit a parameter server's update)"
    )


_HOROVOD_OPS = ("Adasum", "Min", "Max", "Product")
"""Horovod's reduction ops that ftmpi refuses, named in the refusal (Horovod's are integers)."""


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    compression: Compressor = Compression.none,
    backward_passes_per_step: int = 1,
    op: Any = Average,
    gradient_predivide_factor: float = 1.0,
    num_groups: int = 0,
    groups: Any = None,
    sparse_as_dense: bool = False,
    process_set: Any = None,
) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` goes through ftmpi's servers (see module docstring).

    Takes ``hvd.DistributedOptimizer``'s arguments with the same meanings: ``compression``
    (``Compression.fp16`` needs the Horovod backend); ``backward_passes_per_step`` (gradients
    accumulate in ``.grad`` over that many backward passes and ``step()`` reduces the sum, as in
    Horovod); ``op`` (Average or Sum, ftmpi's or Horovod's constants);
    ``gradient_predivide_factor``; ``sparse_as_dense``. ``num_groups``/``groups`` only shape
    Horovod's fusion of per-tensor allreduces; ftmpi always reduces the whole model as one fused
    buffer, so they are checked and have no effect. ``process_set`` must be the global set.

    Call :func:`ftmpi.init` first. The result is an instance of a subclass of
    ``type(optimizer)`` over the same param groups. Raises ``ValueError``/``TypeError`` for bad
    arguments and unnamed parameters, :class:`ftmpi.fatal.UserError` for mixed-dtype ones,
    before any communication.
    """
    op = _reduce_op(op)
    if not gradient_predivide_factor > 0:
        raise ValueError(f"gradient_predivide_factor={gradient_predivide_factor} must be > 0")
    if gradient_predivide_factor != 1.0 and op is not Average:
        raise ValueError("gradient_predivide_factor is only meaningful with op=Average")
    if not isinstance(backward_passes_per_step, int) or backward_passes_per_step < 1:
        raise ValueError(
            f"backward_passes_per_step={backward_passes_per_step!r} must be an int >= 1"
        )
    if not (isinstance(num_groups, int) and num_groups >= 0):
        raise ValueError(f"num_groups={num_groups!r} must be an int >= 0")
    if groups is not None and not isinstance(groups, int | list):
        raise ValueError(f"groups={groups!r} must be None, an int or a list of parameter lists")
    if process_set is not None and getattr(process_set, "process_set_id", 0) != 0:
        raise ValueError(
            "process_set: ftmpi reduces over all workers; pass the global process set (default)"
        )
    if not (
        callable(getattr(compression, "compress", None))
        and callable(getattr(compression, "decompress", None))
    ):
        raise ValueError(
            f"compression={compression!r} has no compress/decompress; use "
            "ftmpi.Compression.none/fp16 or hvd.Compression.none/fp16"
        )
    base = type(optimizer)
    cls = type(base.__name__, (base,), dict(_DistributedOptimizer.__dict__))
    opt: torch.optim.Optimizer = cls(
        optimizer.param_groups,
        named_parameters,
        compression,
        backward_passes_per_step,
        op,
        gradient_predivide_factor,
        sparse_as_dense,
        base,
    )
    if optimizer.state:
        opt.load_state_dict(optimizer.state_dict())
    return opt
