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
import importlib.util
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from ftmpi import events, record
from ftmpi.client import ServerClient
from ftmpi.compression import Compression, Compressor, changes_dtype
from ftmpi.fatal import UserError
from ftmpi.faults import Injector, parse_schedule
from ftmpi.loop import Rollback
from ftmpi.membership import request_due_replacements
from ftmpi.optim_state import (
    class_path,
    group_hparams,
    load_state_entries,
    state_entries,
    tensor_segments,
)
from ftmpi.runtime import Runtime, runtime
from ftmpi.sharding import ParamInfo, Shard, plan_shards
from ftmpi.snapshot import SnapshotError
from ftmpi.stateless import StaleTraining
from ftmpi.timing import PhaseTimes
from ftmpi.wire import PeerFailure

T = TypeVar("T")


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
        super(self.__class__, self).__init__(params)  # type: ignore[misc]
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
        with torch.no_grad():
            for p, _, w in self._ftmpi_slots:
                w.copy_(p)
                if p.device.type == "cpu" and rt.num_servers:
                    p.data = w  # the model's parameter now lives in the weight buffer: no copy
        self._ftmpi_started = False
        self._ftmpi_position = 0
        self._ftmpi_in_run = False
        self._ftmpi_warned_rollback = False
        self._ftmpi_injector = Injector(
            parse_schedule(rt.config.kill),
            "worker",
            rt.role_rank,
            int(rt.late_joiner),  # a replacement carries out the next kill of its index
            rt.job_start,
            run_dir=rt.config.run_dir,
        )
        self._ftmpi_stale = (
            StaleTraining(rt, self._ftmpi_client) if rt.config.logs_gradients else None
        )
        self._ftmpi_times = PhaseTimes()
        self._ftmpi_failed_at: float | None = None
        """Wall time of the first failure seen since the last completed step."""
        self._ftmpi_synchronized = False
        self._ftmpi_should_sync = True
        if rt.late_joiner:
            self._join()
        elif rt.config.resume and rt.config.strategy == "checkpoint":
            self._resume()
        record.track(self)  # its steps and weights go into the run's summary.json

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
        self._ftmpi_injector.at_step(self._ftmpi_position + 1)
        if self._ftmpi_rt.checkpoint_requested:
            self._checkpoint_on_signal()
        retry = self._ftmpi_should_sync and not self._ftmpi_synchronized
        client = self._ftmpi_client
        base = list(client.versions)
        while True:
            try:
                self._data_path(allreduce=retry or self._ftmpi_rt.num_servers == 0)
                break
            except PeerFailure as exc:
                # a push answered before the step failed is retried with its base version, so
                # its server sees it as applied instead of applying it a second time
                client.versions[:] = base
                if self._ftmpi_failed_at is None:
                    self._ftmpi_failed_at = time.time()
                if not self._recover(str(exc)):
                    return loss  # rolled back outside ftmpi.run: this step is dropped
                client.versions[:] = base = self._retry_base(base)
                client.recovered()
                retry = True
        if self._ftmpi_failed_at is not None:  # first step completed since a failure
            events.emit(
                self._ftmpi_rt.config.run_dir,
                "step_resumed",
                role=f"worker {self._ftmpi_rt.role_rank}",
                position=self._ftmpi_position + 1,
                idle_s=round(time.time() - self._ftmpi_failed_at, 6),
            )
            self._ftmpi_failed_at = None
        self._ftmpi_synchronized = False
        self._ftmpi_position += 1
        self._ftmpi_client.position = self._ftmpi_position
        return loss

    def _retry_base(self, base: list[int]) -> list[int]:
        """The versions a step retried after a recovery pushes with: what the recovery left
        (a ``stateless`` rebuild advances a shard by its replayed log), except, in sync mode,
        a rebuilt shard whose replayed log already holds this step's gradient: it keeps the
        step's base, which the server answers as already applied."""
        versions = list(self._ftmpi_client.versions)
        stale = self._ftmpi_stale
        if stale is not None and self._ftmpi_rt.config.mode == "sync":
            for shard, last in stale.replayed_through.items():
                if last == self._ftmpi_position:
                    versions[shard] = base[shard]
        return versions

    def _data_path(self, *, allreduce: bool) -> None:
        """One attempt at the step's communication; raises ``PeerFailure`` on a rank death."""
        rt = self._ftmpi_rt
        t = self._ftmpi_times
        t.steps += 1
        request_due_replacements(rt)  # strategies whose workers train on while a server is down
        if rt.config.mode == "async":
            with t.phase("gather"):
                self._gather_grads()
            self._start_servers()
            live = self._live_shards(self._ftmpi_shards)
            with t.phase("push_pull"):
                self._ftmpi_client.repush(live)
                self._push_pull(live)
            return
        with t.phase("gather"):
            self._gather_grads()
        if allreduce:
            with t.phase("allreduce"):
                self._allreduce()
        if rt.num_servers == 0:
            with t.phase("local_step"):
                for p, g, _ in self._ftmpi_slots:
                    if p.grad is not None:
                        p.grad.copy_(g)
                super(self.__class__, self).step()  # type: ignore[misc]
            return
        self._start_servers()
        live = self._live_shards(self._ftmpi_shards)
        with t.phase("push_pull_broadcast"):
            mine = self._live_shards(self._my_shards())
            self._ftmpi_client.repush(mine)
            self._ftmpi_client.send_hparams(mine, self._hparams())
            self._ftmpi_client.push_pull_broadcast(rt.group, rt.num_workers, rt.role_rank, live)
        with t.phase("scatter"):
            self._scatter_weights()

    # ------------------------------------------------------------- recovery

    def _recover(self, reason: str) -> bool:
        """Join the survivors' recovery. Returns True to retry the step; returns False (or
        raises :class:`ftmpi.Rollback` inside :func:`ftmpi.run`) after a rollback. A failure
        during the recovery itself (e.g. a replacement dying) starts it over."""
        while True:
            try:
                return self._recover_once(reason)
            except PeerFailure as exc:
                reason = str(exc)

    def _recover_once(self, reason: str) -> bool:
        from ftmpi.backends import rebuild_backend
        from ftmpi.membership import recover

        rt = self._ftmpi_rt
        strategy = rt.config.strategy
        result = recover(rt, blocking_strategy=strategy == "checkpoint", reason=reason)
        rebuild_backend(rt, workers_changed=bool(result.failed_workers or result.new_workers))
        if result.new_workers:
            self._welcome()
        if result.failed_servers and strategy == "none":
            raise RuntimeError(
                f"server(s) {result.failed_servers} died and strategy='none' cannot recover their "
                "state; run with strategy checkpoint or stateless (FTMPI_STRATEGY)"
            )
        # shards with no server, or only new ones: their state must come from the workers
        lost = [k for k in range(rt.num_shards) if set(rt.live_chain(k)) <= set(result.respawned)]
        if lost and strategy == "chain":
            raise RuntimeError(
                f"every server of shard(s) {lost} died (chains of {rt.config.chain_length}); "
                "chain replication cannot recover them: use a longer chain_length, or strategy "
                "chain+stateless to rebuild them from the workers"
            )
        stale = self._ftmpi_stale
        if stale is not None:
            live = [s for s in self._ftmpi_shards if rt.live_chain(s.index)]
            if result.respawned:
                rebuild = [s for s in live if s.index in lost]
                stale.rebuild(rebuild, class_path(self._ftmpi_base_class), self._hparams())
                for s in rebuild:  # rebuilt from weights that hold the kept push already
                    self._ftmpi_client.kept.pop(s.index, None)
            cut_short = [s for s in live if s.index in stale.unfinished]
            stale.finish_rebuilds(cut_short)
            if result.respawned or cut_short:
                self._scatter_weights()
        if strategy == "checkpoint" and (result.failed_servers or result.respawned):
            if not self._ftmpi_started:
                return True  # no step has reached the servers: the retry initialises them
            position = self._rollback()
            assert position is not None
            if self._ftmpi_in_run:
                raise Rollback(position)
            if not self._ftmpi_warned_rollback:
                self._ftmpi_warned_rollback = True
                warnings.warn(
                    f"ftmpi rolled the model back to step {position} after a server failure; "
                    "this training loop does not rewind (wrap it with ftmpi.run to replay the "
                    "lost steps with the same data)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
        return True

    def _live_shards(self, shards: list[Shard]) -> list[Shard]:
        """``shards`` that have a live server; the others' gradients are logged (stateless)."""
        if self._ftmpi_stale is None:
            return shards
        down = self._ftmpi_stale.down(shards)
        if down:
            with self._ftmpi_times.phase("log"):
                self._ftmpi_stale.log(down, self._ftmpi_position)
        return [s for s in shards if s not in down]

    def _surviving(self, request: Callable[[], T], *, settle: bool = True) -> T:
        """Run a request to the servers outside ``step()``; after a rank death, join the
        recovery and ask again (``stateless``, with ``settle``: once every shard is back and
        replayed)."""
        while True:
            if settle:
                self._settle()
            try:
                return request()
            except PeerFailure as exc:
                self._recover(str(exc))

    def _settle(self) -> None:
        """``stateless``: wait until every shard has a server again and its log is replayed, so
        what follows sees every gradient computed so far. Collective while a shard is down."""
        stale = self._ftmpi_stale
        while stale is not None and (down := stale.down(self._ftmpi_shards)):
            try:
                stale.wait_for_replacement(down[0])
            except PeerFailure as exc:
                self._recover(str(exc))

    def _checkpoint_on_signal(self) -> None:
        """SIGUSR1 (e.g. Slurm's ``--signal``): worker 0 has every server write a snapshot of
        the last completed step before this step starts, so the snapshot is consistent across
        shards; the event ``signal_checkpoint`` is recorded once it is durable."""
        from ftmpi.membership import is_coordinator

        rt = self._ftmpi_rt
        rt.checkpoint_requested = False
        if not is_coordinator(rt):
            return
        if rt.config.strategy != "checkpoint":
            print(
                f"ftmpi: SIGUSR1 ignored: strategy={rt.config.strategy!r} writes no snapshots "
                "(use strategy checkpoint)",
                file=sys.stderr,
                flush=True,
            )
            return
        if not self._ftmpi_started:
            return  # no step yet: the servers' initial snapshot is the newest state
        versions = self._ftmpi_client.snapshot_now()
        events.emit(
            rt.config.run_dir,
            "signal_checkpoint",
            role=f"worker {rt.role_rank}",
            version=min(versions),
            position=self._ftmpi_position,
            directory=rt.config.snapshot_dir,
        )
        print(
            f"ftmpi: SIGUSR1: snapshot of step {self._ftmpi_position} written to "
            f"{rt.config.snapshot_dir}",
            file=sys.stderr,
            flush=True,
        )

    def _welcome(self) -> None:
        """Survivors' side of :meth:`_join`: worker 0 sends the training position."""
        from ftmpi.broadcast import broadcast_bytes

        doc = {
            "position": self._ftmpi_position,
            "versions": self._ftmpi_client.versions,
            "started": self._ftmpi_started,
        }
        broadcast_bytes(json.dumps(doc).encode(), 0)
        if self._joiner_takes_params(self._ftmpi_started):
            self._broadcast_params()

    def _joiner_takes_params(self, started: bool) -> bool:
        """Whether a joining worker takes the weights from worker 0 rather than the servers.

        Sync mode does: a worker that died with its push in flight may have had that push
        applied, and the survivors retry the step from the weights of the versions they hold
        (``client.versions``, reset to the step's base), which the servers may have passed.
        The joiner computes its gradient on those same weights, so the retried pushes carry
        the base version and the servers answer them as applied, once. So does a joiner that
        comes before the first step reached the servers (``started`` False: they have no
        state yet). Async workers each push on the weights they hold, so a joiner pulls the
        servers' newest weights."""
        rt = self._ftmpi_rt
        return not rt.num_servers or rt.config.mode == "sync" or not started

    def _broadcast_params(self) -> None:
        """Without servers, a joining worker takes the parameters from worker 0."""
        backend = self._ftmpi_rt.backend
        assert backend is not None
        with torch.no_grad():
            for p in self._ftmpi_params:
                backend.broadcast_(p.data, 0)

    def _join(self) -> None:
        """A replacement worker joins training in progress: it takes the data position and the
        weights before its first forward pass, from worker 0 (sync) or the servers (async; see
        :meth:`_joiner_takes_params`)."""
        from ftmpi.broadcast import broadcast_bytes

        rt = self._ftmpi_rt
        doc = json.loads(broadcast_bytes(None, 0))
        self._ftmpi_position = self._ftmpi_client.position = int(doc["position"])
        self._ftmpi_client.versions = list(doc["versions"])
        started = bool(doc.get("started", True))
        if not self._joiner_takes_params(started):
            self._ftmpi_client.pull(self._ftmpi_shards)
            self._scatter_weights()
        else:
            self._broadcast_params()
            self._params_to_buffer()
        self._ftmpi_started = started  # if not, the first step initialises the servers
        events.emit(
            rt.config.run_dir,
            "worker_joined",
            role=f"worker {rt.role_rank}",
            position=self._ftmpi_position,
            workers=rt.num_workers,
        )

    def _resume(self) -> None:
        """``resume=1`` (a relaunched job): if the checkpoint directory holds snapshots, load
        the newest version every shard has and take its data position (``position``; a
        :class:`ftmpi.TrainingState` built afterwards starts its batches there)."""
        position = self._rollback(resume=True)
        if position is None:
            return
        self._ftmpi_started = True
        if self._ftmpi_rt.role_rank == 0:
            print(f"ftmpi: resumed from the snapshot at step {position}", file=sys.stderr)

    def _rollback(self, *, resume: bool = False) -> int | None:
        """Checkpoint strategy: the coordinator picks the newest snapshot every shard has and
        has the servers load it; every worker then pulls the restored weights. Returns this
        worker's data position (``resume``: None when there is no snapshot at all)."""
        from ftmpi.broadcast import broadcast_bytes
        from ftmpi.membership import is_coordinator

        rt = self._ftmpi_rt
        client = self._ftmpi_client
        doc: dict[str, Any] | None = None
        if is_coordinator(rt):
            try:
                doc = client.restore_snapshots(allow_none=resume)
            except SnapshotError as exc:  # every worker stops with it, none waits
                doc = {"error": str(exc)}
        doc = json.loads(broadcast_bytes(json.dumps(doc).encode(), 0))
        if doc is None:
            return None
        if "error" in doc:
            raise SnapshotError(doc["error"])
        client.pull(self._ftmpi_shards)
        self._scatter_weights()
        positions = doc["positions"]
        position = int(positions.get(str(rt.role_rank), self._ftmpi_position))
        self._ftmpi_position = client.position = position
        events.emit(
            rt.config.run_dir,
            "resumed" if resume else "rollback",
            role=f"worker {rt.role_rank}",
            position=position,
            versions=client.versions,
        )
        return position

    # ------------------------------------------------------------ ftmpi API

    def step_times(self) -> dict[str, float]:
        """Mean milliseconds per step spent in each phase of ``step()`` on this worker."""
        return self._ftmpi_times.per_step_ms()

    def stale_stats(self) -> dict[str, int]:
        """``stateless``: gradients this worker logged while a shard had no server, and how many
        of them replacements have acknowledged."""
        st = self._ftmpi_stale
        return {"logged": st.logged if st else 0, "replayed": st.replayed if st else 0}

    def server_stats(self, *, wait: bool = True) -> list[dict[str, Any]]:
        """Counters from every shard's server (updates applied, staleness, dropped messages).

        ``stateless``: by default this waits until every shard has a server again and its log
        is replayed, so the counters cover every gradient computed so far. ``wait=False`` (a
        progress report during training) never waits: a shard that has no server now is left
        out, and the worker trains on."""
        if not self._ftmpi_started:
            return []
        if wait:
            return self._surviving(self._ftmpi_client.stats)
        rt = self._ftmpi_rt
        return self._surviving(
            lambda: self._ftmpi_client.stats(
                [s for s in self._ftmpi_shards if rt.live_chain(s.index)]
            ),
            settle=False,
        )

    @torch.no_grad()
    def pull(self) -> None:
        """Load the servers' current weights into the model (e.g. before evaluating in async
        mode, where this worker's copy may lag)."""
        if self._ftmpi_started:
            self._surviving(lambda: self._ftmpi_client.pull(self._ftmpi_shards))
            self._scatter_weights()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as ``torch.optim.Optimizer.state_dict()`` returns it.

        Once training has started the servers own the state, so this fetches it from them
        (collective-free: any worker may call it) and returns it in the usual layout, ready
        for ``torch.save`` and a later ``load_state_dict``.
        """
        if self._ftmpi_started and self._ftmpi_rt.num_servers:
            by_name = {self._ftmpi_names[p]: p for p in self._ftmpi_params}
            self.state.clear()
            for tensors, scalars in self._surviving(self._ftmpi_client.fetch_state):
                load_state_entries(self, by_name, tensors, scalars)
        return super(self.__class__, self).state_dict()  # type: ignore[misc]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; the servers receive it (with the model's current weights from
        worker 0) at the next ``step()``. Call it on every worker, as with any optimizer."""
        super(self.__class__, self).load_state_dict(state_dict)  # type: ignore[misc]
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

    def _gather_grads(self) -> None:
        for p, g, _ in self._ftmpi_slots:
            if p.grad is None:
                g.zero_()
            elif p.grad.is_sparse:
                if not self._ftmpi_sparse_as_dense:
                    raise ValueError(
                        f"parameter {self._ftmpi_names[p]!r} has a sparse gradient; pass "
                        "sparse_as_dense=True to DistributedOptimizer (servers hold dense weights)"
                    )
                g.copy_(p.grad.to_dense())
            else:
                g.copy_(p.grad)

    def _allreduce(self) -> None:
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
                self._state_by_shard(),
                # a shard whose servers died before training started gets its state when a
                # replacement is rebuilt from the workers (stateless)
                [s for s in self._ftmpi_shards if rt.live_chain(s.index)],
            )
        assert rt.backend is not None
        rt.backend.barrier()
        self._ftmpi_started = True

    def _state_by_shard(
        self,
    ) -> dict[int, tuple[list[dict[str, Any]], list[np.ndarray], dict[str, Any]]]:
        """Each shard's optimizer state: table, byte views of the live tensors, scalars."""
        tensors, scalars = state_entries(self, self._ftmpi_names)
        out = {}
        for shard in self._ftmpi_shards:
            names = {slot.name for slot in shard.slots}
            mine = [(k, t) for k, t in tensors if k.rpartition("/")[0] in names]
            table, buf = tensor_segments(mine)
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
    opt = cls(
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
