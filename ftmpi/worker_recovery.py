"""The worker's side of the recovery protocol, owned by one object: :class:`WorkerRecovery`.

``ftmpi.DistributedOptimizer`` keeps Horovod's API and the data path; everything a worker does
about a failure is here (in the spirit of torchft's ``Manager``, which owns the failure state
so that its optimizer wrapper need not). When a step, or a request to the servers outside a
step, fails with ``PeerFailure`` (a rank died, or the coordinator revoked the world to have a
replacement spawned), every surviving worker runs the same sequence:

1. ``membership.recover``: revoke, shrink, agree on replacements and spawn them (servers take
   part too). ``snapshots`` waits for the replacements of down servers inside it;
2. ``backends.rebuild_backend``: the collective backend over the new workers' communicator;
3. replacement workers are welcomed (:meth:`WorkerRecovery.welcome`): worker 0 sends them the
   data position, the versions and, where they take them from the workers, the weights;
4. a failure the strategy cannot survive ends the job on every worker with the same
   ``RuntimeError`` (:meth:`Strategy.unrecoverable`);
5. the strategy's hook (:class:`~ftmpi.strategies.WorkerSide`): ``rebuild`` rebuilds the
   shards that lost every server from the workers' weights and logs; ``snapshots`` rolls
   every shard back to the newest snapshot they all have; ``replication`` needs nothing (the
   servers' chains fail over).

A ``PeerFailure`` during any of these (a second death, a replacement dying) starts the sequence
over from 1: that is the retry loop of :meth:`WorkerRecovery.recover`, and the only loop.

The strategy's part is chosen once, from ``Strategy.named(config.strategy)``: a composition of
the mechanisms whose flags are on (``chain+stateless`` is replication and rebuild together).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from ftmpi import events
from ftmpi.backends import rebuild_backend
from ftmpi.broadcast import broadcast_bytes, broadcast_optimizer_state
from ftmpi.client import ServerClient
from ftmpi.loop import Rollback
from ftmpi.membership import is_coordinator, recover, replacements_due, request_due_replacements
from ftmpi.mirror import Mirror
from ftmpi.optim_state import class_path
from ftmpi.runtime import Runtime
from ftmpi.sharding import Shard
from ftmpi.snapshot import SnapshotError
from ftmpi.stateless import StaleTraining
from ftmpi.strategies import Strategy, WorkerSide
from ftmpi.timing import PhaseTimes
from ftmpi.wire import CommTimeout, PeerFailure, RemoteError

T = TypeVar("T")


class Trainee(Protocol):
    """What the recovery reads and changes of the optimizer it serves
    (``ftmpi.optimizer._DistributedOptimizer``)."""

    position: int
    """Steps completed (setting it sets the client's position too)."""
    _ftmpi_started: bool
    """Whether a step has initialised the servers."""
    _ftmpi_in_run: bool
    """Whether the training loop runs inside :func:`ftmpi.run` (a rollback raises there)."""
    _ftmpi_params: list[torch.Tensor]
    param_groups: list[dict[str, Any]]

    def _scatter_weights(self) -> None:
        """Copy the client's weight buffer into the parameters."""

    def _params_to_buffer(self) -> None:
        """Copy the parameters into the client's weight buffer."""

    def _hparams(self) -> list[dict[str, Any]]:
        """The hyper-parameters of every param group."""
        ...

    def _load_servers_state(self) -> None:
        """``mirror``: load the servers' optimizer state into this worker's optimizer."""

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (``mirror``: this worker's own)."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Install optimizer state (``mirror``: a joining worker takes worker 0's)."""


@dataclass(frozen=True)
class Retry:
    """How to retry a step after a recovery (:meth:`WorkerRecovery.recover_step`)."""

    base: list[int]
    """Per shard, the version the retried pushes carry (also set in ``client.versions``)."""
    workers_changed: bool
    """Whether the set of workers changed (one died or joined): gradients reduced before the
    failure were reduced over another set of workers."""


# ----------------------------------------------------------------- the strategies' mechanisms


class _Mechanism:
    """One recovery mechanism's part of :class:`~ftmpi.strategies.WorkerSide`; each hook
    does nothing unless the mechanism needs it."""

    def live_shards(self, shards: list[Shard], position: int) -> list[Shard]:
        return shards

    def retry_base(self, base: Sequence[int], versions: list[int], position: int) -> list[int]:
        return versions

    def after_view_change(
        self, failed_servers: Sequence[int], respawned: Sequence[int], unserved: Sequence[int]
    ) -> bool:
        return True

    def wait_while_server_down(self) -> None:
        return None


class _Replication(_Mechanism):
    """``replicates``: a chain fails over among its servers; a worker only retries its step
    against the chain's new head (``ServerClient.recovered`` re-sends kept pushes)."""


class _Rebuild(_Mechanism):
    """``rebuilds``: while a shard has no server the workers log its gradients
    (:class:`~ftmpi.stateless.StaleTraining`); a replacement is rebuilt from them."""

    def __init__(
        self, rt: Runtime, client: ServerClient, trainee: Trainee, optimizer_class: str
    ) -> None:
        self.rt = rt
        self.client = client
        self.trainee = trainee
        self.optimizer_class = optimizer_class
        self.stale = StaleTraining(rt, client)
        self.times: PhaseTimes | None = None

    def live_shards(self, shards: list[Shard], position: int) -> list[Shard]:
        down = self.stale.down(shards)
        if not down:
            return shards
        if self.times is not None:
            with self.times.phase("log"):
                self.stale.log(down, position)
        else:
            self.stale.log(down, position)
        return [s for s in shards if s not in down]

    def retry_base(self, base: Sequence[int], versions: list[int], position: int) -> list[int]:
        """In sync mode a rebuilt shard whose replayed log already holds this step's gradient
        keeps the step's base, which the server answers as already applied."""
        if self.rt.config.mode == "sync":
            for shard, last in self.stale.replayed_through.items():
                if last == position:
                    versions[shard] = base[shard]
        return versions

    def after_view_change(
        self, failed_servers: Sequence[int], respawned: Sequence[int], unserved: Sequence[int]
    ) -> bool:
        rt, stale = self.rt, self.stale
        live = [s for s in self.client.shards if rt.live_chain(s.index)]
        if respawned:
            rebuild = [s for s in live if s.index in unserved]
            stale.rebuild(rebuild, self.optimizer_class, self.trainee._hparams())
            for s in rebuild:  # rebuilt from weights that hold the kept push already
                self.client.kept.pop(s.index, None)
        cut_short = [s for s in live if s.index in stale.unfinished]
        stale.finish_rebuilds(cut_short)
        if respawned or cut_short:
            self.trainee._scatter_weights()
        return True

    def wait_while_server_down(self) -> None:
        """Return once every shard has a server; raises ``PeerFailure`` when the recovery that
        spawns the replacement starts, ``TimeoutError`` past ``timeout + down_for``."""
        while down := self.stale.down(self.client.shards):
            self.stale.wait_for_replacement(down[0])


class _Mirror(_Mechanism):
    """``mirror`` placement: the workers hold the whole state and step their own optimizer, so
    a failure costs them no rollback and no rebuild. After any change of view (a server or a
    worker lost or replaced) the updates still unanswered are dropped and the next step gives
    every server its shard's whole state from worker 0 (``_start_servers``), at the step's
    version: a replacement, a chain that lost members and a shard whose leader changed all
    mirror the workers again, whatever the strategy."""

    def __init__(self, mirror: Mirror, trainee: Trainee) -> None:
        self.mirror = mirror
        self.trainee = trainee

    def after_view_change(
        self, failed_servers: Sequence[int], respawned: Sequence[int], unserved: Sequence[int]
    ) -> bool:
        self.mirror.forget()
        self.trainee._ftmpi_started = False
        return True


class _Snapshots(_Mechanism):
    """``snapshots``: after a server's death every shard rolls back to the newest snapshot
    they all have, and the step is dropped (replayed by :func:`ftmpi.run`)."""

    def __init__(self, rt: Runtime, client: ServerClient, trainee: Trainee) -> None:
        self.rt = rt
        self.client = client
        self.trainee = trainee
        self.warned_rollback = False

    def after_view_change(
        self, failed_servers: Sequence[int], respawned: Sequence[int], unserved: Sequence[int]
    ) -> bool:
        if not (failed_servers or respawned):
            return True
        if not self.trainee._ftmpi_started:
            return True  # no step has reached the servers: the retry initialises them
        position = self.rollback()
        assert position is not None
        if self.trainee._ftmpi_in_run:
            raise Rollback(position)
        if not self.warned_rollback:
            self.warned_rollback = True
            warnings.warn(
                f"ftmpi rolled the model back to step {position} after a server failure; "
                "this training loop does not rewind (wrap it with ftmpi.run to replay the "
                "lost steps with the same data)",
                RuntimeWarning,
                stacklevel=6,
            )
        return False

    def rollback(self, *, resume: bool = False) -> int | None:
        """The coordinator picks the newest snapshot every shard has and has the servers load
        it; every worker then pulls the restored weights. Returns this worker's data position
        (``resume``: None when there is no snapshot at all). Collective over the workers.

        On failure every worker raises the coordinator's error (same class and message):
        ``SnapshotError``, ``RemoteError``, ``CommTimeout`` or ``RuntimeError``; none is left
        waiting for the coordinator. ``PeerFailure`` (a rank died meanwhile) propagates on the
        coordinator, whose recovery revokes the others out of their wait."""
        rt, client = self.rt, self.client
        doc: dict[str, Any] | None = None
        failure: Exception | None = None
        if is_coordinator(rt):
            try:
                doc = client.restore_snapshots(allow_none=resume)
            except PeerFailure:
                raise
            except (SnapshotError, RuntimeError, CommTimeout) as exc:
                failure = exc
                doc = {"error": str(exc), "type": type(exc).__name__}
        doc = json.loads(broadcast_bytes(json.dumps(doc).encode(), 0))
        if failure is not None:
            raise failure
        if doc is None:
            return None
        if "error" in doc:
            raise _RESTORE_ERRORS.get(str(doc.get("type")), RuntimeError)(doc["error"])
        client.pull(client.shards)
        self.trainee._scatter_weights()
        positions = doc["positions"]
        position = int(positions.get(str(rt.role_rank), self.trainee.position))
        self.trainee.position = position
        events.emit(
            rt.config.run_dir,
            "resumed" if resume else "rollback",
            role=f"worker {rt.role_rank}",
            position=position,
            versions=client.versions,
        )
        return position


_RESTORE_ERRORS: dict[str, type[Exception]] = {
    "SnapshotError": SnapshotError,
    "RemoteError": RemoteError,
    "CommTimeout": CommTimeout,
}
"""Errors of a restore that the other workers raise as the coordinator did (by class name);
any other is raised as ``RuntimeError`` with the same message."""


class _Composed:
    """A :class:`~ftmpi.strategies.WorkerSide` made of the strategy's mechanisms, in order."""

    def __init__(self, parts: Sequence[_Mechanism]) -> None:
        self.parts = list(parts)

    def live_shards(self, shards: list[Shard], position: int) -> list[Shard]:
        for part in self.parts:
            shards = part.live_shards(shards, position)
        return shards

    def retry_base(self, base: Sequence[int], versions: list[int], position: int) -> list[int]:
        for part in self.parts:
            versions = part.retry_base(base, versions, position)
        return versions

    def after_view_change(
        self, failed_servers: Sequence[int], respawned: Sequence[int], unserved: Sequence[int]
    ) -> bool:
        retry = True
        for part in self.parts:
            retry = part.after_view_change(failed_servers, respawned, unserved) and retry
        return retry

    def wait_while_server_down(self) -> None:
        for part in self.parts:
            part.wait_while_server_down()


# ------------------------------------------------------------------------------ the owner


class WorkerRecovery:
    """Owns a worker's recovery: the sequence of the module docstring, its retry loop, the
    failure state (when the last failure was seen, the strategy's state: gradient logs, the
    rollback warning) and a replacement's joining.

    Every public call either completes or raises; none waits forever (each collective and
    request has ``config.timeout``). ``PeerFailure`` never escapes :meth:`recover`: a death
    during a recovery starts it over."""

    def __init__(
        self,
        rt: Runtime,
        client: ServerClient,
        trainee: Trainee,
        base_class: type[torch.optim.Optimizer],
        times: PhaseTimes,
        mirror: Mirror | None = None,
    ) -> None:
        self.rt = rt
        self.client = client
        self.trainee = trainee
        self.strategy = Strategy.named(rt.config.strategy)
        self.failed_at: float | None = None
        """Wall time of the first failure seen since the last completed step."""
        self.mirror = mirror
        self._workers_changed = False
        """Whether the latest recovery (with its restarts) changed the set of workers."""
        # with a mirror the workers hold the state: no strategy acts on their side
        acts = mirror is None
        self.snapshots = (
            _Snapshots(rt, client, trainee) if acts and self.strategy.snapshots else None
        )
        self.rebuild = (
            _Rebuild(rt, client, trainee, class_path(base_class))
            if acts and self.strategy.rebuilds
            else None
        )
        if self.rebuild is not None:
            self.rebuild.times = times
        parts: list[_Mechanism] = []
        if mirror is not None:
            parts.append(_Mirror(mirror, trainee))
        elif self.strategy.replicates:
            parts.append(_Replication())
        if self.rebuild is not None:
            parts.append(self.rebuild)
        if self.snapshots is not None:
            parts.append(self.snapshots)
        self.side: WorkerSide = _Composed(parts)

    @property
    def stale(self) -> StaleTraining | None:
        """``rebuilds``: this worker's gradient logs; None otherwise."""
        return self.rebuild.stale if self.rebuild is not None else None

    # ------------------------------------------------------------------- start of training

    def start(self) -> None:
        """At the optimizer's creation: a replacement worker joins the training in progress
        (:meth:`join`); a ``resume`` run of ``snapshots`` loads the newest snapshot every shard
        has. Collective over the workers. Raises what :meth:`join` or the restore raises (the
        same error on every worker, see ``_Snapshots.rollback``)."""
        if self.rt.late_joiner:
            self.join()
        elif self.rt.config.resume and (self.strategy.snapshots or self.strategy.replicates):
            # a chain resumes from the node copies gathered after a lost node, if any
            restorer = self.snapshots or _Snapshots(self.rt, self.client, self.trainee)
            position = restorer.rollback(resume=True)
            if position is None:
                return
            self.trainee._ftmpi_started = True
            if self.rt.config.mirrored:  # the workers step their own optimizer: its state too
                self.surviving(self.trainee._load_servers_state)
            if self.rt.role_rank == 0:
                print(f"ftmpi: resumed from the snapshot at step {position}", file=sys.stderr)

    def join(self) -> None:
        """A replacement worker joins training in progress: it takes the data position and the
        weights before its first forward pass, from worker 0 (sync) or the servers (async; see
        :meth:`joiner_takes_params`). Raises ``PeerFailure``/``CommTimeout`` if a rank dies or
        worker 0 does not answer (the job then ends: a joiner has nothing to recover)."""
        rt, client, t = self.rt, self.client, self.trainee
        doc = json.loads(broadcast_bytes(None, 0))
        t.position = int(doc["position"])
        client.versions = list(doc["versions"])
        started = bool(doc.get("started", True))
        if not self.joiner_takes_params(started):
            client.pull(client.shards)
            t._scatter_weights()
        else:
            self._broadcast_params()
            t._params_to_buffer()
        if rt.config.mirrored:  # the optimizer state lives on the workers too
            broadcast_optimizer_state(t, 0)
            started = False  # the survivors give the servers the whole state at the next step
        t._ftmpi_started = started  # if not, the first step initialises the servers
        events.emit(
            rt.config.run_dir,
            "worker_joined",
            role=f"worker {rt.role_rank}",
            position=t.position,
            workers=rt.num_workers,
        )

    def welcome(self) -> None:
        """Survivors' side of :meth:`join`: worker 0 sends the training position (and the
        weights, see :meth:`joiner_takes_params`). Raises ``PeerFailure`` if a rank dies."""
        t = self.trainee
        doc = {
            "position": t.position,
            "versions": self.client.versions,
            "started": t._ftmpi_started,
        }
        broadcast_bytes(json.dumps(doc).encode(), 0)
        if self.joiner_takes_params(t._ftmpi_started):
            self._broadcast_params()
        if self.rt.config.mirrored:
            broadcast_optimizer_state(t, 0)

    def joiner_takes_params(self, started: bool) -> bool:
        """Whether a joining worker takes the weights from worker 0 rather than the servers.

        Sync mode does: a worker that died with its push in flight may have had that push
        applied, and the survivors retry the step from the weights of the versions they hold
        (``client.versions``, reset to the step's base), which the servers may have passed.
        The joiner computes its gradient on those same weights, so the retried pushes carry
        the base version and the servers answer them as applied, once. So does a joiner that
        comes before the first step reached the servers (``started`` False: they have no
        state yet), and any joiner without servers. Async workers each push on the weights
        they hold, so a joiner pulls the servers' newest weights."""
        rt = self.rt
        return not rt.num_servers or rt.config.mode == "sync" or not started

    def _broadcast_params(self) -> None:
        backend = self.rt.backend
        assert backend is not None
        with torch.no_grad():
            for p in self.trainee._ftmpi_params:
                backend.broadcast_(p.data, 0)

    # --------------------------------------------------------------------------- a step

    def before_attempt(self) -> None:
        """Before each attempt at a step's communication: the coordinator revokes the world
        once a dead rank's down time has passed (strategies that go on while a server is
        down), raising ``PeerFailure`` so the step joins the recovery that replaces it; with a
        mirror, a death seen while sending the previous step's update is raised here."""
        if self.mirror is not None:
            self.mirror.raise_failure()
        request_due_replacements(self.rt)

    def attempt_will_recover(self) -> bool:
        """Whether :meth:`before_attempt` would raise now (a death seen by the mirror, a
        replacement to admit); never raises. A step that averages during backward asks at its
        first gradient and, if so, starts nothing until :meth:`before_attempt` has raised."""
        return (self.mirror is not None and self.mirror.failure is not None) or replacements_due(
            self.rt
        )

    def live_shards(self, shards: list[Shard]) -> list[Shard]:
        """Of ``shards``, those this step pushes to; ``rebuilds`` logs this step's gradient for
        the others (and waits past ``max_staleness``: ``PeerFailure`` when the replacement's
        recovery starts, ``TimeoutError`` past ``timeout + down_for``)."""
        return self.side.live_shards(shards, self.trainee.position)

    def recover_step(self, reason: str, base: list[int]) -> Retry | None:
        """A step's attempt failed with ``PeerFailure`` (``reason``): recover, and say how to
        retry it, or None when it is dropped (rolled back outside :func:`ftmpi.run`).

        ``base``: the versions the step started from; a push answered before the failure is
        retried with them, so its server answers it as applied instead of applying it twice.
        Raises :class:`ftmpi.Rollback` inside ``ftmpi.run`` after a rollback, and what
        :meth:`recover` raises."""
        client = self.client
        client.versions[:] = base
        if self.failed_at is None:
            self.failed_at = time.time()
        if not self._recover(reason):
            return None
        base = self.side.retry_base(base, list(client.versions), self.trainee.position)
        client.versions[:] = base
        client.recovered()
        return Retry(list(base), self._workers_changed)

    def step_completed(self) -> None:
        """After a step completed on this worker: the first since a failure records
        ``step_resumed`` with the time since the failure was seen."""
        if self.failed_at is None:
            return
        rt = self.rt
        events.emit(
            rt.config.run_dir,
            "step_resumed",
            role=f"worker {rt.role_rank}",
            position=self.trainee.position + 1,
            idle_s=round(time.time() - self.failed_at, 6),
        )
        self.failed_at = None

    # --------------------------------------------------------------------- the recovery

    def recover_after_step(self, reason: str) -> None:
        """A death seen once this worker's step had completed (``mirror``: while sending to
        the servers): recover, and record ``step_resumed`` with the time it took (the worker's
        idle time; nothing of the step is retried). Raises what :meth:`recover` raises."""
        seen = time.time()
        self.recover(reason)
        rt = self.rt
        events.emit(
            rt.config.run_dir,
            "step_resumed",
            role=f"worker {rt.role_rank}",
            position=self.trainee.position,
            idle_s=round(time.time() - seen, 6),
        )

    def recover(self, reason: str) -> bool:
        """Join the survivors' recovery (the sequence of the module docstring). Returns True
        to retry what failed, False after a rollback outside :func:`ftmpi.run`.

        Guarantees on return: every worker is in the same new view, on the same backend, with
        every shard it pushes to served (or logged, ``rebuilds``). A ``PeerFailure`` during the
        recovery starts it over. Raises :class:`ftmpi.Rollback` inside ``ftmpi.run`` after a
        rollback; ``RuntimeError`` with :meth:`Strategy.unrecoverable`'s message (on every
        worker alike) when the strategy cannot survive the failure; the restore's error
        (``SnapshotError``, ``RemoteError``, ``CommTimeout``, ``RuntimeError``) on every worker
        when a rollback cannot load a snapshot; ``CommTimeout`` when a peer stops answering."""
        return self._recover(reason)

    def _recover(self, reason: str) -> bool:
        self._workers_changed = False
        while True:
            try:
                return self._recover_once(reason)
            except PeerFailure as exc:
                reason = str(exc)

    def _recover_once(self, reason: str) -> bool:
        rt = self.rt
        waits = self.strategy.waits_for_replacements(rt.config.mirrored)
        result = recover(rt, blocking_strategy=waits, reason=reason)
        if result.failed_workers or result.new_workers:
            self._workers_changed = True
        rebuild_backend(rt, workers_changed=self._workers_changed)
        if result.new_workers:
            self.welcome()
        # shards with no server, or only new ones: their state must come from the workers
        unserved = [
            k for k in range(rt.num_shards) if set(rt.live_chain(k)) <= set(result.respawned)
        ]
        why = self.strategy.unrecoverable(result.failed_servers, unserved)
        if why:
            raise RuntimeError(why)
        return self.side.after_view_change(result.failed_servers, result.respawned, unserved)

    # --------------------------------------------------------------- outside of a step

    def surviving(self, request: Callable[[], T], *, settle: bool = True) -> T:
        """Run a request to the servers outside ``step()``; after a rank death, join the
        recovery and ask again (``rebuilds``, with ``settle``: once every shard is back and
        replayed, so the answer covers every gradient computed so far). Raises what
        :meth:`recover` raises, and the request's own errors (``RemoteError``)."""
        while True:
            if settle:
                self.settle()
            try:
                return request()
            except PeerFailure as exc:
                self.recover(str(exc))

    def settle(self) -> None:
        """``rebuilds``: wait until every shard has a server again and its log is replayed.
        Collective while a shard is down; returns at once otherwise. Raises ``TimeoutError``
        when no replacement comes within ``timeout + down_for``."""
        while True:
            try:
                self.side.wait_while_server_down()
                return
            except PeerFailure as exc:
                self.recover(str(exc))

    def checkpoint_on_signal(self) -> None:
        """SIGUSR1 (e.g. Slurm's ``--signal``): the coordinator has every server write a
        snapshot of the last completed step before this step starts, so the snapshot is
        consistent across shards; the event ``signal_checkpoint`` is recorded once it is
        durable. Without ``snapshots`` the request is ignored, saying so. Raises what the
        servers' snapshot request raises (``RemoteError``, ``PeerFailure``, ``CommTimeout``)."""
        rt = self.rt
        rt.checkpoint_requested = False
        if not is_coordinator(rt):
            return
        if not self.strategy.snapshots:
            print(
                f"ftmpi: SIGUSR1 ignored: strategy={str(self.strategy.name)!r} writes no "
                "snapshots (use strategy checkpoint)",
                file=sys.stderr,
                flush=True,
            )
            return
        if not self.trainee._ftmpi_started:
            return  # no step yet: the servers' initial snapshot is the newest state
        versions = self.client.snapshot_now()
        position = self.trainee.position
        events.emit(
            rt.config.run_dir,
            "signal_checkpoint",
            role=f"worker {rt.role_rank}",
            version=min(versions),
            position=position,
            directory=rt.config.snapshot_dir,
        )
        print(
            f"ftmpi: SIGUSR1: snapshot of step {position} written to {rt.config.snapshot_dir}",
            file=sys.stderr,
            flush=True,
        )

    def stale_stats(self) -> dict[str, int]:
        """``rebuilds``: gradients this worker logged while a shard had no server, and how many
        of them replacements have acknowledged (zeros otherwise)."""
        st = self.stale
        return {"logged": st.logged if st else 0, "replayed": st.replayed if st else 0}
