"""The parameter server's request loop: one shard's replica, answering workers and its chain.

A server rank sits in :meth:`ParameterServer.serve` from ``ftmpi.init()`` until every worker has
sent STOP. It answers requests one at a time, in arrival order, through one table of
:class:`~ftmpi.wire.Kind` -> handler:

- INIT   (worker 0, once): shard layout, optimizer class, hyper-parameters, initial weights and
  optimizer state. Replies OK.
- PUSH   a gradient for the shard, computed on weights of version ``header.version``. The server
  runs ``optimizer.step()`` once (version += 1) and replies with the new weights. Staleness
  (server version minus the gradient's base version) is recorded; it is 0 in sync mode.
- PULL   replies with the current weights.
- HPARAMS new param-group hyper-parameters (LR scheduler changes); no reply.
- STATE  replies with the optimizer state: a JSON table, then the raw tensor bytes.
- STATS  replies with counters as JSON.
- STOP   the sender is done.
- REPLAY a worker's folded gradient log (``stateless``); SNAPSHOT, SNAPSHOTS, RESTORE: the
  snapshot store (``checkpoint``, :mod:`ftmpi.snapshot_store`); FORWARD, COMMITTED, RECEIVED,
  CHAIN_STOP, STATE_ASK, STATE_READY, STATE_MISSING, STATE_SIZE, STATE_TRANSFER: the chain
  (``chain``, :mod:`ftmpi.chain`).

Messages from another run (header run id) or an older view are drained and counted as dropped,
never applied; so are messages of a kind this loop does not handle, and of no known kind at all
(with a warning naming the value). The shard's state and its updates are the replica's
(:mod:`ftmpi.replica`); a peer's death is handed to the recovery (:mod:`ftmpi.server_recovery`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch

from ftmpi import events, failpoints, wire
from ftmpi.chain import ChainLink
from ftmpi.faults import Injector, parse_schedule
from ftmpi.mirror import gap
from ftmpi.replica import ShardReplica, Update
from ftmpi.resources import peak_rss_bytes
from ftmpi.runtime import Runtime
from ftmpi.server_recovery import ServerRecovery
from ftmpi.server_wire import ServerWire, StateSend
from ftmpi.snapshot_store import RestoreRefused, server_stores
from ftmpi.strategies import Strategy
from ftmpi.wire import Header, Kind

Handler = Callable[[Header, int], None]


class ParameterServer:
    """One server rank's request loop; implements :class:`ftmpi.chain.ChainHost`."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.strategy = Strategy.named(rt.config.strategy)
        self.index = rt.server_index
        """This server's slot."""
        self.shard_index = rt.shard_of(self.index)
        """The shard this server holds (its chain's shard)."""
        self.replica = ShardReplica()
        self.store, self.node_copy = server_stores(
            rt, self.index, self.replica, lambda message: _warn(rt, self.index, message)
        )
        """Snapshots to restore from (``checkpoint``'s, or a chain's gathered node copies), and
        this server's node copy (a chain's, with ``node_copy_dir``; else it writes nothing)."""
        self.wire = ServerWire(rt, self.index, self.shard_index, self.replica)
        self.stopped: set[int] = set()
        self.answer_ok: set[int] = set()
        """Workers whose pending answer is to a gradient log: they keep their weights."""
        self.staleness_sum = 0
        self.staleness_max = 0
        self.link = (
            ChainLink(rt, self.index, self.shard_index, self) if self.strategy.replicates else None
        )
        self.recovery = ServerRecovery(rt, self.strategy, self.link, self.store, self._renumber)
        self.new_hparams: list[dict[str, Any]] | None = None
        """Hyper-parameters received since the last update (forwarded down a chain with it)."""
        self.handlers: dict[Kind, Handler] = {
            Kind.INIT: self._on_init,
            Kind.PUSH: self._on_push,
            Kind.PULL: self._on_pull,
            Kind.HPARAMS: self._on_hparams,
            Kind.STATS: self._on_stats,
            Kind.STATE: self._on_state,
            Kind.STOP: self._on_stop,
            Kind.SNAPSHOTS: self._on_snapshots,
            Kind.RESTORE: self._on_restore,
            Kind.SNAPSHOT: self._on_snapshot,
            Kind.REPLAY: self._on_replay,
        }
        """Kind -> handler of every request this server answers."""
        if self.link is not None:
            link = self.link
            self.handlers |= {
                Kind.FORWARD: self._on_forward,
                Kind.COMMITTED: lambda h, src: link.on_committed(h.version),
                Kind.RECEIVED: lambda h, src: link.on_received(h.version),
                Kind.CHAIN_STOP: lambda h, src: setattr(link, "pred_stopped", True),
                **{k: lambda h, src: link.on_state_request(h.kind) for k in wire.STATE_REQUESTS},
                Kind.STATE_SIZE: self._on_state_size,
                Kind.STATE_TRANSFER: self._on_state_transfer,
                Kind.REPLICATE: self._on_replicate,
            }
        position = partial(chain_position, rt, self.index)
        self.injector = Injector(
            parse_schedule(rt.config.kill),
            "server",
            self.index,
            rt.incarnations[self.index],
            rt.job_start,
            run_dir=rt.config.run_dir,
            chain_position=position,
        )
        failpoints.arm(
            failpoints.parse_failpoints(rt.config.failpoints),
            "server",
            self.index,
            rt.incarnations[self.index],
            run_dir=rt.config.run_dir,
            chain_position=position,
        )
        torch.set_num_threads(rt.config.server_threads)

    # ------------------------------------------------------ ChainHost

    @property
    def version(self) -> int:
        return self.replica.version

    @property
    def has_state(self) -> bool:
        return self.replica.has_state

    def grad_buffer(self) -> np.ndarray | None:
        if not self.replica.has_state:
            return None
        return self.replica.grad_bytes().view(np.uint8).reshape(-1)

    def apply(self, update: Update, *, loaded: bool = False) -> None:
        """Apply ``update`` to the replica, then snapshot if one is due (``checkpoint``)."""
        self.replica.apply(update, loaded=loaded)
        self.store.after_update()
        self.node_copy.after_update()

    def reply_weights(self, worker: int) -> None:
        self.wire.reply(worker, Kind.WEIGHTS, self.replica.weights_bytes())

    def answer_push(self, worker: int) -> None:
        if self.rt.config.mirrored or worker in self.answer_ok:  # the version says it all
            self.answer_ok.discard(worker)
            return self.wire.reply(worker, Kind.OK, None)
        self.reply_weights(worker)

    def state_nbytes(self) -> int:
        return self.replica.state_nbytes()

    def transfer_state(self, slot: int, *, waited: float = 0.0) -> None:
        self.wire.send_state(slot, waited=waited)

    def start_replicate(self, slot: int, into: np.ndarray | None) -> StateSend:
        return self.wire.start_state_send(slot, Kind.REPLICATE, into=into)

    # ----------------------------------------------------------------- loop

    def serve(self) -> None:
        """Answer requests until every worker has sent STOP.

        Raises :class:`~ftmpi.wire.CommTimeout` if no request arrives for
        ``config.server_idle_timeout`` seconds; a peer's death
        (:class:`~ftmpi.wire.PeerFailure`) is recovered from (:class:`ServerRecovery`), and
        after every worker has stopped ends the loop with a warning. Raises
        :class:`~ftmpi.snapshot.SnapshotError` when a snapshot cannot be written (or, written
        in the background, has failed by the end of the next request), so the job ends
        instead of training on without durable state.
        """
        cfg = self.rt.config
        if self.link is not None and self.rt.incarnations[self.index] > 0:
            self.link.ask_for_state()
        while not self._done():
            try:
                self.handle_next(wire.ANY_SOURCE, cfg.server_idle_timeout)
            except wire.PeerFailure as exc:
                if set(self.rt.workers) <= self.stopped:
                    # training is over and the workers are leaving: they will not join a
                    # recovery, so waiting for one would hang the job at exit
                    reason = f"a peer died after every worker stopped; not recovering: {exc}"
                    _warn(self.rt, self.index, reason)
                    break
                self.recovery.recover(str(exc))
        self.store.flush()
        self.node_copy.discard()  # training is over: the copy is not needed any more

    def handle_next(self, source: int, timeout: float) -> None:
        """Receive the next message (from world rank ``source``, or any) and handle it."""
        try:
            header, src = wire.recv_header(
                self.rt.world,
                source,
                tag=wire.TAG_HEADER,
                timeout=timeout,
                what=f"server {self.index} waiting for requests",
                polling=self._idle_polling(),
            )
        except wire.UnknownKind as exc:
            _warn(self.rt, self.index, f"dropping a message: {exc}")
            assert exc.source is not None
            return self.wire.drain(exc.nbytes, exc.source)
        handler = self.handlers.get(header.kind)
        if header.run != self.rt.run or header.view != self.rt.view or handler is None:
            return self.wire.drain(header.nbytes, src)
        handler(header, src)
        self.store.raise_if_failed()  # a failed background write ends the job now
        self.node_copy.raise_if_failed()

    def handle_from(self, slot: int) -> None:
        self.handle_next(self.rt.server_world_rank(slot), self.rt.config.timeout)

    def _idle_polling(self) -> wire.Polling:
        """How this server waits for its next request: a chain member behind the head hears
        only from its chain (forwards, acks), never from a waiting worker, so it waits
        patiently and leaves the cores to the workers and the head."""
        if self.link is not None and not self.link.is_head:
            return wire.PATIENT
        return wire.URGENT

    def _done(self) -> bool:
        """Every worker has stopped and (on a chain) everything is forwarded and committed; a
        chain member then stops its successor."""
        if not set(self.rt.workers) <= self.stopped:
            return False
        if self.link is None:
            return True
        if self.link.replicates_state:
            self.link.flush()
        if not self.link.drained():
            return False
        self.link.stop_successor()
        return True

    def _renumber(self, remap: dict[int, int]) -> None:
        """Keep per-worker bookkeeping under the ranks of the shrunk world."""
        self.stopped = {remap[r] for r in self.stopped if r in remap}
        self.answer_ok = {remap[r] for r in self.answer_ok if r in remap}
        self.replica.renumber(remap)
        if self.link is not None:
            self.link.renumber(remap)

    # --------------------------------------------------------- shard state

    def _on_init(self, header: Header, src: int) -> None:
        """A worker's initial state for the shard; replied to with OK once installed."""
        if self._install(header, src, "initial weights"):
            self.wire.reply(src, Kind.OK, None)

    def _on_state_transfer(self, header: Header, src: int) -> None:
        """A chain predecessor's whole state (see :mod:`ftmpi.chain`); no reply."""
        self._install(header, src, "the chain's state", transfer=True)

    def _install(self, header: Header, src: int, what: str, *, transfer: bool = False) -> bool:
        """Receive a whole shard state (spec, then weights and optimizer state) and install it;
        hand it on down the chain; write its first snapshot (``snapshots``). False (an error
        replied) when it is another shard's."""
        spec, binary = self.wire.recv_state(header, src, what, transfer=transfer)
        if int(spec["shard"]["index"]) != self.shard_index:
            self.wire.reply_error(
                src,
                f"server {self.index} holds shard {self.shard_index}, not {spec['shard']['index']}",
            )
            return False
        self.replica.adopt(spec, binary, int(header.version))
        if self.link is not None:
            self.link.holds_whole_state()
        self.recovery.after_state_installed()
        self.node_copy.after_state_installed()
        return True

    def _on_replicate(self, header: Header, src: int) -> None:
        """The predecessor's whole state (every ``replicate_every`` updates, :mod:`ftmpi.chain`)
        replaces this replica's once that is passed on, and is passed on; no reply."""
        assert self.link is not None
        self.link.wait_replicated()
        spec, binary = self.wire.recv_state(header, src, "the chain's state", transfer=False)
        self.replica.adopt(spec, binary, int(header.version))
        self.link.ack(Kind.RECEIVED, self.version)
        self.link.replicate(copy=False)
        self.node_copy.after_state_installed()
        self.injector.at_step(self.version)

    def _on_state_size(self, header: Header, src: int) -> None:
        """A chain predecessor will send this replacement ``header.state_nbytes`` bytes of
        state: map a buffer for them, then ask for the state (see :mod:`ftmpi.chain`)."""
        assert self.link is not None
        if self.has_state:  # the state came another way meanwhile
            return
        self.wire.map_state_buffer(header.state_nbytes)
        self.link.ask_for_state(Kind.STATE_READY)

    # ------------------------------------------------------------- updates

    def _on_push(self, header: Header, src: int) -> None:
        r = self.replica
        if r.grads is None or r.optimizer is None:
            self.wire.drain(header.nbytes, src)
            self.wire.reply_error(src, f"server {self.index} got a gradient before INIT")
            return
        grad_bytes = r.grad_bytes()
        if header.nbytes != grad_bytes.nbytes or header.shard != self.shard_index:
            self.wire.drain(header.nbytes, src)
            self.wire.reply_error(
                src,
                f"server {self.index}: gradient for shard {header.shard} "
                f"with {header.nbytes} bytes does not match this shard "
                f"({grad_bytes.nbytes} bytes)",
            )
            return
        self.wire.recv(src, grad_bytes, "a gradient")
        if self.rt.config.mirrored and (why := gap(self.version, header.version)):
            return self.wire.reply_error(src, f"server {self.index}: {why}")
        if self._already_applied(header, src):
            self._answer(src)
            return
        staleness = max(self.version - header.version, 0)
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        hparams, self.new_hparams = self.new_hparams, None
        update = Update(self.version + 1, src, header.seq, hparams, grad_bytes)
        self._take(update, src, early=True)
        self.injector.at_step(self.version)

    def _on_replay(self, header: Header, src: int) -> None:
        """Apply a worker's gradient log, folded into one gradient (``stateless``), exactly once:
        a log whose last sequence number this server has seen is not applied again."""
        doc = self.wire.recv_json(header, src)
        if not self.has_state:
            raise RuntimeError(f"server {self.index} got a gradient log before its shard state")
        grad_bytes = self.replica.grad_bytes()
        self.wire.recv(src, grad_bytes, "a folded gradient log")
        self.answer_ok.add(src)
        if doc["last_seq"] <= self.replica.last_seq.get(src, -1):
            self._answer(src)
            return
        failpoints.failpoint("replay")
        count = int(doc["count"])
        hparams, self.new_hparams = self.new_hparams, None
        update = Update(
            self.version + count,
            src,
            int(doc["last_seq"]),
            hparams,
            grad_bytes,
            count,
            float(doc["lr_scale"]),
            replay=True,
        )
        self.staleness_max = max(self.staleness_max, int(doc["max_age"]))
        events.emit(
            self.rt.config.run_dir,
            "replayed",
            role=f"server {self.index}",
            worker=src,
            count=count,
            lr_scale=update.lr_scale,
            version=update.version,
        )
        self._take(update, src, early=False)
        self.injector.at_step(self.version)

    def _take(self, update: Update, src: int, *, early: bool) -> None:
        """Apply ``update``, whose gradient is in the gradient buffer, and answer ``src``; on a
        chain the head keeps a copy for forwarding and submits it (``ChainLink.submit``;
        ``early``: a fresh push, which may be answered before it commits)."""
        if self.link is None:
            self.apply(update, loaded=True)
            self._answer(src)
            return
        update.grad = self.link.keep(update.grad)
        self.link.submit(update, lambda: self.apply(update, loaded=True), src, early=early)

    def _answer(self, src: int) -> None:
        """Reply to a push with the current weights: now, or (on a chain) once the ack mode
        covers this server's version."""
        if self.link is None:
            self.answer_push(src)
        else:
            self.link.hold(src, self.version)

    def _already_applied(self, header: Header, src: int) -> bool:
        """A push retried after a recovery that the server had applied before: in sync mode its
        base version is behind the server's; in async mode its sequence number is not new."""
        if self.rt.config.mode == "sync":
            return header.version < self.version
        return header.seq <= self.replica.last_seq.get(src, -1)

    def _on_forward(self, header: Header, src: int) -> None:
        assert self.link is not None
        self.link.on_forward(header, src, lambda out, what: self.wire.recv(src, out, what))
        self.injector.at_step(self.version)

    # ----------------------------------------------------- other requests

    def _on_pull(self, header: Header, src: int) -> None:
        if self.replica.weights is None:
            self.wire.reply_error(src, f"server {self.index} has no weights yet (no INIT)")
            return
        self.reply_weights(src)

    def _on_hparams(self, header: Header, src: int) -> None:
        groups = self.wire.recv_json(header, src)
        if self.replica.set_hparams(groups):
            self.new_hparams = groups

    def _on_stats(self, header: Header, src: int) -> None:
        self.wire.reply_json(src, server_stats(self))

    def _on_state(self, header: Header, src: int) -> None:
        if self.replica.optimizer is None:
            self.wire.reply_error(src, f"server {self.index} has no optimizer yet (no INIT)")
            return
        doc, buf = self.replica.optimizer_state()
        self.wire.reply_json(src, doc)
        self.wire.reply_data(src, buf, "sending optimizer state")

    def _on_stop(self, header: Header, src: int) -> None:
        self.stopped.add(src)

    def _on_snapshot(self, header: Header, src: int) -> None:
        """Write a snapshot of the current version now and reply once it is durable."""
        if self.replica.optimizer is None:
            self.wire.reply_error(src, f"server {self.index} has no state yet (no INIT)")
            return
        self.wire.reply_json(src, {"version": self.store.write_now()})

    def _on_snapshots(self, header: Header, src: int) -> None:
        """Reply with the versions of this shard's snapshots that verify."""
        self.wire.reply_json(src, {"versions": self.store.versions()})

    def _on_restore(self, header: Header, src: int) -> None:
        """Load this shard's snapshot of version ``header.version``; reply with its positions."""
        try:
            doc = self.store.restore(header.version)
        except RestoreRefused as exc:
            self.wire.reply_error(src, str(exc))
            return
        if self.link is not None:  # a chain's head restored: its members take the state
            self.link.holds_whole_state()
        self.node_copy.after_state_installed()
        self.wire.reply_json(src, doc)


def server_stats(server: ParameterServer) -> dict[str, Any]:
    """A server's counters since start: updates applied, staleness, dropped messages, apply
    time, seconds waited to send a chain's next whole state, peak resident memory (bytes)."""
    r = server.replica
    return {
        "server": server.index,
        "version": r.version,
        "applied": r.applied,
        "replayed": r.replayed,
        "staleness_mean": server.staleness_sum / r.applied if r.applied else 0.0,
        "staleness_max": server.staleness_max,
        "dropped": server.wire.dropped,
        "apply_seconds": r.apply_seconds,
        "replication_waits": 0.0 if server.link is None else server.link.replication_waits,
        "numel": 0 if r.shard is None else r.shard.numel,
        "in_horovod": _in_horovod(),
        "peak_rss": peak_rss_bytes(),
    }


def chain_position(rt: Runtime, slot: int) -> tuple[int, bool, bool]:
    """(shard, is head, is tail) of server ``slot`` now, for ``head``/``tail`` kill specs."""
    shard = rt.shard_of(slot)
    live = rt.live_chain(shard)
    return shard, live[:1] == [slot], live[-1:] == [slot]


def _warn(rt: Runtime, index: int, message: str) -> None:
    print(f"ftmpi server {index}: warning: {message}", file=sys.stderr, flush=True)
    events.emit(rt.config.run_dir, "warning", role=f"server {index}", message=message)


def _in_horovod() -> bool:
    """Whether this process has joined Horovod (a server never should)."""
    hvd = sys.modules.get("horovod.torch")
    return bool(hvd is not None and hvd.is_initialized())
