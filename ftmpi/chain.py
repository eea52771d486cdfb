"""Chain replication of one shard (van Renesse & Schneider), the server side.

A shard is held by a chain of server slots, head first (``Runtime.chains``). Workers talk to the
head only. The head applies a pushed gradient and forwards it, with its version, the pushing
worker's sequence number and any new hyper-parameters, to its successor; every server applies
what it receives in version order and forwards it on; the tail acknowledges ``COMMITTED`` back up
the chain, and each server forgets the updates it had kept for re-sending once they are
committed. Replicas run the same optimizer on the same gradients, so they hold bit-identical
weights and optimizer state.

When the head answers a push (:meth:`ChainLink.submit`; it applies the update, answers, then
forwards it):

- ``chain_ack = "tail"``: an update commits when the tail has it (``COMMITTED``), and the head
  answers a fresh push once every *earlier* update is committed. So the worker computes its next
  gradient while this update travels down the chain, and by the time its next push is answered
  this one is on every live replica. Until then the pushing worker keeps the gradient and, after
  a recovery, sends it again before anything else (``ServerClient.repush``): a head that answered
  and died before forwarding loses nothing, and a head that has it answers the repeat once it is
  committed. No failure of fewer than R servers loses an update (in sync mode, unless the shard's
  leader worker, which alone keeps the gradient, dies with the head). Repeated pushes and replayed
  gradient logs are answered only once committed. The tail acknowledges on receipt, before its
  own apply: every member applies what it receives before it handles another message, so the
  head and middles have applied an update by the time they see its acknowledgement, and the
  tail applies it next.
- ``chain_ack = "next"``: once the successor has received it (``RECEIVED``), the paper's relaxed
  mode.
- ``chain_ack = "next"`` and ``replicate_every = N > 1`` (the paper's chain, which "replicates
  weights only after a predetermined number of weight updates"): the head answers every push at
  once and forwards no update. Every N versions it copies its whole state (weights, optimizer
  state, the workers' sequence numbers) into one buffer and starts sending it to its successor
  (``REPLICATE``) without waiting; each member installs the state it receives, acknowledges it
  (``RECEIVED``) and passes it on the same way, from its own state (which changes only when the
  next one comes). The head waits only when its next state is due and the successor has not yet
  acknowledged the previous one, that is when the successor takes longer than N updates to take
  a state. No member applies an optimizer step but the head, and a member holds its state plus
  at most one copy and one incoming state, whatever N. If the head dies, its successor holds
  one of the head's last two states: fewer than 2N updates are lost (a replayed gradient log
  counts as the gradients in it).

Reconfiguration after a membership change (:meth:`ChainLink.reconfigure`), run by every server
of the chain in the new view; predecessors and successors are recomputed from the live slots:

- head died: the successor is head now; workers retry their push there, and it answers at once
  if it already applied it (sync: the gradient's base version is behind; async: the sequence
  number is not new).
- middle died: its predecessor re-sends every update the tail has not committed; the receiver
  skips versions it already has.
- tail died: its predecessor is the tail; it commits everything it holds.
- a replacement slot joins at the tail: once it is in its request loop it asks its predecessor
  for the shard state (``STATE_ASK``); the predecessor forwards nothing to it until then. The
  predecessor answers with the state's size (``STATE_SIZE``); the replacement maps a receive
  buffer of that size and asks again (``STATE_READY``); the predecessor then sends the whole
  state (``STATE_TRANSFER``, laid out as a worker's INIT) and forwards as usual. The receiver
  is ready, its memory mapped, when the bytes arrive, so the transfer runs at the link's speed,
  and neither the replacement's start-up nor its page faults count as transfer time. A member
  that is sent updates before it has any state (its transfer was cut short by another failure)
  answers ``STATE_MISSING``, and its predecessor sends the whole state at once.

Nothing behind the head is on a worker's wait while the chain keeps up, so the members behind
the head wait for their next message, and a head for its successor to take a forward, with
``wire.PATIENT`` polling: on a node with more ranks than cores they leave the cores to the
workers and the head (``ParameterServer._idle_polling``).

Every message of an older view is gone with its revoked communicator, so all in-flight forwards
and acks are re-sent by these rules, never assumed delivered.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ftmpi import wire
from ftmpi.failpoints import failpoint
from ftmpi.optim_state import Payload
from ftmpi.replica import Update
from ftmpi.wire import Header, Kind

if TYPE_CHECKING:
    from ftmpi.runtime import Runtime
    from ftmpi.server_wire import StateSend

__all__ = ["BufferPool", "ChainHost", "ChainLink", "Update"]


class ChainHost(Protocol):
    """What a chain member needs of the server it runs in (``ftmpi.server``)."""

    @property
    def version(self) -> int:
        """The shard's version this server holds (0 before it has the state)."""
        ...

    @property
    def has_state(self) -> bool:
        """Whether this server holds its shard's state."""
        ...

    def grad_buffer(self) -> np.ndarray | None:
        """The replica's gradient buffer as bytes (a single forwarded update is received
        straight into it at the tail), or None before the state exists."""
        ...

    def apply(self, update: Update) -> None:
        """Apply ``update`` (its gradient copied in) and whatever follows an update here (a
        periodic snapshot)."""
        ...

    def answer_push(self, worker: int) -> None:
        """Answer ``worker``'s push (with the current weights, or in ``mirror`` placement the
        version alone); raises ``PeerFailure`` if it died."""
        ...

    def state_nbytes(self) -> int:
        """Bytes of the whole shard state as :meth:`transfer_state` sends it."""
        ...

    def transfer_state(self, slot: int, *, waited: float) -> None:
        """Send the whole shard state to server ``slot`` (``STATE_TRANSFER``) and wait for
        the send; raises ``PeerFailure`` if a rank dies meanwhile."""
        ...

    def handle_from(self, slot: int) -> None:
        """Receive the next message from server ``slot`` and handle it as the request loop
        would; raises ``CommTimeout`` if none comes within ``config.timeout``."""
        ...

    def start_replicate(self, slot: int, into: np.ndarray | None) -> StateSend:
        """Start sending the whole shard state to server ``slot`` (``REPLICATE``): first
        copied into ``into`` (:meth:`state_nbytes` bytes), or in place when None (then the
        state must not change until the send completes)."""
        ...


class BufferPool:
    """Gradient buffers of a chain member, reused once their update is committed.

    A new multi-megabyte buffer is fresh memory: its first write faults every page (2.8 ms of
    CPU for a 4 MB gradient, six times the copy itself), and a chain member would take two per
    update. Buffers come back only on the normal path (committed, applied at the tail, or a
    duplicate), never after a failure, when MPI may still hold them. Only chains that forward
    every update use them (``replicate_every = 1``): a member keeps an update until the tail
    has it, one or two per pushing worker, so a handful of free buffers cover the steady
    state."""

    def __init__(self, keep: int = 4) -> None:
        """``keep``: free buffers kept for reuse."""
        self.keep = keep
        self.free: list[np.ndarray] = []

    def take(self, nbytes: int) -> np.ndarray:
        """A byte buffer of ``nbytes`` (contents undefined)."""
        for i, buf in enumerate(self.free):
            if buf.nbytes == nbytes:
                return self.free.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def give(self, updates: list[Update]) -> None:
        """Take back the gradient buffers of ``updates``, which nothing references any more."""
        for u in updates:
            if len(self.free) < self.keep and u.grad.flags.owndata and u.grad.dtype == np.uint8:
                self.free.append(u.grad)


class ChainLink:
    """One server's place in its shard's chain: neighbours, un-committed updates, held replies."""

    def __init__(self, rt: Runtime, slot: int, shard_index: int, host: ChainHost) -> None:
        self.rt = rt
        self.slot = slot
        """This server's slot."""
        self.shard_index = shard_index
        """The shard of this chain."""
        self.host = host
        self.pending: list[Update] = []
        """Forwarded to the successor, not yet committed by the tail (re-sent after a failure)."""
        self.committed = 0
        """Highest version the tail has (and applies before anything else), as far as this
        server knows."""
        self.received = 0
        """Highest version the successor has received (``next`` ack mode)."""
        self.held: list[tuple[int, int]] = []
        """(worker world rank, version it waits for) replies the head may not send yet."""
        self.pred_stopped = False
        """The predecessor has forwarded everything and stopped (``CHAIN_STOP``)."""
        self.awaiting: int | None = None
        """A successor slot (a replacement) that has no shard state yet and will ask for it;
        nothing is forwarded to it before, since the state it gets holds every update."""
        self.pool = BufferPool()
        """Gradient buffers for updates kept until committed (see :class:`BufferPool`)."""
        # whole states every replicate_every updates (see the module docstring): the state on
        # its way to the successor, the version last sent, the head's copy being sent (dropped
        # after a failure), and the seconds waited for the successor to take a state
        self.replicates_state = rt.config.replicates_state
        self.replicating: StateSend | None = None
        self.replicated = 0
        self.copy_buffer: np.ndarray | None = None
        self.replication_waits = 0.0
        self.awaiting_since = 0.0
        """When this server learned that ``awaiting`` needs the state (``time.perf_counter``)."""

    # ------------------------------------------------------------ topology

    def _neighbours(self) -> tuple[int | None, int | None]:
        """(predecessor, successor) slots among the live members of this chain."""
        live = self.rt.live_chain(self.shard_index)
        i = live.index(self.slot)
        return (live[i - 1] if i > 0 else None, live[i + 1] if i + 1 < len(live) else None)

    @property
    def pred(self) -> int | None:
        return self._neighbours()[0]

    @property
    def succ(self) -> int | None:
        return self._neighbours()[1]

    @property
    def is_head(self) -> bool:
        return self.pred is None

    def acked(self) -> int:
        """Highest version the head may answer for under the configured ack mode."""
        if self.succ is None or self.replicates_state:
            return self.host.version
        if self.rt.config.chain_ack == "next":
            return max(self.received, self.committed)
        return self.committed

    # ------------------------------------------------------------- sending

    def _send(self, slot: int, header: Header, payload: np.ndarray | None, what: str) -> None:
        cfg = self.rt.config
        wire.send(
            self.rt.world,
            self.rt.server_world_rank(slot),
            header,
            payload,
            tag=wire.TAG_HEADER,
            data_tag=wire.TAG_DATA,
            chunk_bytes=cfg.chunk_bytes,
            timeout=cfg.timeout,
            what=f"server {self.slot} {what}",
        )

    def _header(self, kind: Kind, version: int, nbytes: int = 0, state_nbytes: int = 0) -> Header:
        rt = self.rt
        return Header(kind, rt.run, version, self.shard_index, 0, rt.view, nbytes, state_nbytes)

    def start_forward(self, updates: list[Update]) -> list[Any]:
        """Start sending ``updates`` to the successor (kept for re-sending until committed);
        returns the requests to complete with :meth:`finish`. No-op at the tail."""
        succ = self.succ
        if succ is None or not updates or succ == self.awaiting:
            return []
        self.pending += updates
        cfg = self.rt.config
        doc = wire.encode_json(
            {"updates": [u.meta() for u in updates], "grad_nbytes": int(updates[0].grad.nbytes)}
        )
        grads = [u.grad for u in updates]  # sent in place, one segment per update
        dest = self.rt.server_world_rank(succ)
        what = f"server {self.slot} forwarding updates to server {succ}"
        header = self._header(Kind.FORWARD, updates[0].version, doc.nbytes)
        reqs = wire.isend_request(
            self.rt.world, dest, header, doc, grads, chunk_bytes=cfg.chunk_bytes, what=what
        )
        return [reqs, doc, grads]

    def forward_while(self, updates: list[Update], apply: Callable[[], None]) -> None:
        """Forward ``updates`` to the successor while ``apply()`` applies them here. The local
        apply happens even if the forward fails, so this server never holds (for re-sending) an
        update it has not applied; the failure is raised afterwards."""
        try:
            started = self.start_forward(updates)
        except wire.PeerFailure:
            apply()
            raise
        if started:
            failpoint("forward")
        apply()
        self.finish(started)

    def finish(self, started: list[Any]) -> None:
        """Wait for a forward started by :meth:`start_forward`."""
        if started:
            what = "forwarding updates down the chain"
            # patient: the update is answered already (or waits for a commit further down)
            wire.wait_all(started[0], self.rt.config.timeout, what, wire.PATIENT)

    def ack(self, kind: Kind, version: int) -> None:
        """Tell the predecessor (if any) about ``version``: ``COMMITTED``, ``RECEIVED``, or one
        of the state requests (:data:`ftmpi.wire.STATE_REQUESTS`)."""
        pred = self.pred
        if pred is not None:
            self._send(pred, self._header(kind, version), None, "acknowledging")

    # ---------------------------------------------------------------- head

    def submit(
        self, update: Update, apply: Callable[[], None], worker: int, *, early: bool = False
    ) -> None:
        """Head: apply ``update`` (``apply()``), answer ``worker`` with the new weights, then
        forward the update down the chain. The answer goes out at once when there is no
        successor or the chain replicates whole states (and then a state is sent once
        ``replicate_every`` versions have passed), else once :meth:`acked` allows (see the
        module docstring); ``early`` (a fresh push, with ``tail`` ack): once every *earlier*
        update is committed, so the worker computes its next gradient while this one travels
        down the chain. The forward starts even if the answer fails (the worker died)."""
        if self.replicates_state:
            due = update.version - self.replicated >= self.rt.config.replicate_every
            if due:
                self.await_successor()
            apply()
            try:
                self.host.answer_push(worker)
            finally:
                if due:
                    failpoint("answered")
                    self.replicate(copy=True)
            return
        apply()
        try:
            if self.succ is None:
                self.host.answer_push(worker)
            else:
                early_ok = early and self.rt.config.answers_before_commit
                self.hold(worker, update.base if early_ok else update.version)
                failpoint("answered")
        finally:
            self.finish(self.start_forward([update]))

    def hold(self, worker: int, after: int) -> None:
        """Head: answer ``worker`` once version ``after`` is acknowledged (see :meth:`acked`)."""
        self.held.append((worker, after))
        self.release()

    def release(self) -> None:
        """Head: send every held reply whose version is acknowledged."""
        if not self.held:
            return
        acked = self.acked()
        ready = [h for h in self.held if h[1] <= acked]
        self.held = [h for h in self.held if h[1] > acked]
        for worker, _ in ready:
            self.host.answer_push(worker)

    def flush(self) -> None:
        """At shutdown, whole-state replication: send the head's newest state, and wait."""
        if self.is_head and self.host.version > self.replicated:
            self.replicate(copy=False)  # nothing changes the state any more
        self.wait_replicated()

    # ------------------------------------------------- whole-state replication

    def replicate(self, *, copy: bool) -> None:
        """Start sending this server's whole state to its successor (``replicates_state``),
        once the previous one is sent (:meth:`wait_replicated`). ``copy``: from a copy (the
        head goes on applying updates); else in place (a member behind the head changes its
        state only when the next one comes, and waits for this send first). Nothing is sent to
        a replacement that has not taken its first state (:meth:`hand_over_state`)."""
        succ = self.succ
        if succ is None or succ == self.awaiting or not self.host.has_state:
            return
        self.wait_replicated()
        into = None
        if copy:
            nbytes = self.host.state_nbytes()
            if self.copy_buffer is None or self.copy_buffer.nbytes != nbytes:
                self.copy_buffer = np.empty(nbytes, dtype=np.uint8)
            into = self.copy_buffer
        self.replicating = self.host.start_replicate(succ, into)
        self.replicated = self.host.version

    def await_successor(self) -> None:
        """Head, before the update that makes its next state due: wait (handling the
        successor's messages) until the successor has acknowledged the previous state."""
        succ = self.succ
        t0 = time.perf_counter()
        while succ is not None and succ != self.awaiting and self.received < self.replicated:
            self.host.handle_from(succ)
        self.replication_waits += time.perf_counter() - t0

    def wait_replicated(self) -> None:
        """Wait until the state being sent to the successor is sent (``PeerFailure``: it died)."""
        if self.replicating is None:
            return
        sending, self.replicating = self.replicating, None
        t0 = time.perf_counter()
        what = f"server {self.slot} sending its state down the chain"
        wire.wait_all(sending.reqs, self.rt.config.timeout, what, wire.PATIENT)
        self.replication_waits += time.perf_counter() - t0

    # ------------------------------------------------------------- replica

    def on_forward(self, header: Header, src: int, recv: Callable[[Payload, str], None]) -> None:
        """Apply a batch of updates from the predecessor and pass the new ones on."""
        s = self.host
        doc = np.empty(header.nbytes, dtype=np.uint8)
        recv(doc, "forwarded updates")
        fwd = wire.decode_json(doc)
        metas, nbytes = fwd["updates"], int(fwd["grad_nbytes"])
        tail = self.succ is None
        own = s.grad_buffer() if tail else None
        if own is not None and len(metas) == 1 and own.nbytes == nbytes:
            grads = [own]  # the tail keeps nothing: one update goes straight where it applies
        else:
            grads = [self.pool.take(nbytes) for _ in metas]
        recv(grads, "forwarded gradients")
        if not s.has_state:  # a replacement whose state transfer was cut short by a failure
            self.ack(Kind.STATE_MISSING, s.version)
            return
        updates = [
            Update(m["version"], m["src"], m["seq"], m["hparams"], g)
            for m, g in zip(metas, grads, strict=True)
        ]
        new = [u for u in updates if u.version > s.version]
        if new and new[0].version != s.version + 1:
            raise RuntimeError(
                f"server {self.slot} at version {s.version} was forwarded version "
                f"{new[0].version}: an update is missing"
            )
        if self.rt.config.chain_ack == "next" and updates:
            self.ack(Kind.RECEIVED, updates[-1].version)

        def apply() -> None:
            for u in new:
                s.apply(u)

        if tail:
            # The tail commits what it has received before applying it: it applies it before
            # handling anything else (even if the ack fails), and every other replica applies
            # an update before it handles the ack, so the tail's apply is off the worker's wait.
            self.committed = max(s.version, new[-1].version if new else 0)
            try:
                self.ack(Kind.COMMITTED, self.committed)
            finally:
                apply()
        else:
            self.forward_while(new, apply)
        kept = {id(u) for u in self.pending}
        self.pool.give([u for u in updates if id(u) not in kept])  # at the tail, or duplicates
        if not tail and updates and updates[-1].version <= self.committed:
            # re-sent after a reconfiguration, and already committed downstream
            self.ack(Kind.COMMITTED, self.committed)

    def on_state_request(self, kind: Kind) -> None:
        """Answer the successor's request for the shard state: ``STATE_ASK`` with its size
        (:meth:`offer_state`), ``STATE_READY`` with the state, both only if this server expects
        the request (its successor is the replacement it awaits); ``STATE_MISSING`` (sent in
        answer to a forward) with the state always. Without state itself, this server hands
        the state on when it gets it."""
        succ = self.succ
        asked = kind is not Kind.STATE_MISSING
        if succ is None or not self.host.has_state or (asked and succ != self.awaiting):
            return
        if kind is Kind.STATE_ASK:
            self.offer_state(succ)
        else:
            self.hand_over_state(succ)

    def on_received(self, version: int) -> None:
        """The successor has received every update up to ``version`` (``next`` ack mode)."""
        self.received = max(self.received, version)
        self.release()

    def on_committed(self, version: int) -> None:
        """The tail has every update up to ``version``: forget them, pass the commit up."""
        self.committed = max(self.committed, version)
        self.pool.give([u for u in self.pending if u.version <= version])
        self.pending = [u for u in self.pending if u.version > version]
        self.ack(Kind.COMMITTED, version)
        self.release()

    # ----------------------------------------------------- reconfiguration

    def renumber(self, rank_map: dict[int, int]) -> None:
        """Keep the pushing workers of held updates under the ranks of a shrunk world."""
        for u in self.pending:
            u.src = rank_map.get(u.src, -1)

    def reconfigure(self, respawned: list[int]) -> None:
        """Re-establish the chain in a new view (see the module docstring)."""
        failpoint("reconfigure")
        self.held = []  # workers retry their pushes after a recovery
        if self.replicates_state:
            _abandon(self.replicating)
            self.replicating, self.copy_buffer, self.replicated, self.received = None, None, 0, 0
        succ = self.succ
        if succ is None:
            self.pending = []
            self.committed = self.host.version
            self.ack(Kind.COMMITTED, self.host.version)
        elif succ in respawned or succ == self.awaiting:
            # the replacement asks for the state once it is ready to receive it
            if succ != self.awaiting:
                self.awaiting, self.awaiting_since = succ, time.perf_counter()
            self.pending = []
        elif self.pending:
            again, self.pending = self.pending, []
            self.finish(self.start_forward(again))

    def offer_state(self, succ: int) -> None:
        """Tell the successor how many bytes its state will be (``STATE_SIZE``), so that it can
        map its receive buffer before the bytes come."""
        nbytes = self.host.state_nbytes()
        self._send(
            succ,
            self._header(Kind.STATE_SIZE, self.host.version, state_nbytes=nbytes),
            None,
            "offering its state",
        )

    def keep(self, grad: np.ndarray) -> np.ndarray:
        """Head: a copy of a pushed gradient, kept for re-sending until the tail commits it
        (``grad`` itself where no update is forwarded: ``replicates_state``)."""
        if self.replicates_state:
            return grad
        kept = self.pool.take(grad.nbytes)
        np.copyto(kept, grad.view(np.uint8).reshape(-1))
        return kept

    def holds_whole_state(self) -> None:
        """This server has just installed a whole state (the workers' first, a peer's or a
        restored one): everything up to its version is committed, and the successor gets it."""
        self.committed = self.host.version
        succ = self.succ
        if succ is not None:
            self.hand_over_state(succ)

    def hand_over_state(self, succ: int) -> None:
        """Send the successor the whole shard state; it then holds (and commits) everything
        this server has, so nothing is left to re-send."""
        self.wait_replicated()
        self.pending = []
        waited = time.perf_counter() - self.awaiting_since if self.awaiting == succ else 0.0
        self.awaiting = None
        self.host.transfer_state(succ, waited=waited)
        self.committed = self.replicated = self.received = self.host.version
        self.ack(Kind.COMMITTED, self.committed)
        self.release()  # answers held while the successor had no state

    def ask_for_state(self, kind: Kind = Kind.STATE_ASK) -> None:
        """A replacement with no shard state: ask the predecessor for it (see the module
        docstring): ``STATE_ASK`` when the request loop starts and after every recovery (a
        request sent in an older view may be lost with its communicator), ``STATE_READY``
        once the receive buffer is mapped."""
        if not self.host.has_state and self.pred is not None:
            self.ack(kind, self.host.version)

    def stop_successor(self) -> None:
        """Tell the successor that every update has been forwarded."""
        succ = self.succ
        if succ is not None:
            self._send(succ, self._header(Kind.CHAIN_STOP, self.host.version), None, "stopping")

    def drained(self) -> bool:
        """Nothing left to forward or to see committed, and the predecessor has stopped."""
        return (
            not self.pending
            and self.replicating is None
            and self.awaiting is None
            and (self.pred is None or self.pred_stopped)
        )


def _abandon(sending: StateSend | None) -> None:
    """A state send of an older view (its communicator is revoked): let its requests end, in
    error, before the buffer they read from is dropped."""
    if sending is not None:
        with contextlib.suppress(wire.PeerFailure, wire.CommTimeout):
            wire.wait_all(sending.reqs, 1.0, "a state sent in an older view")
