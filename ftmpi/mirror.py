"""``mirror`` placement: the workers own the training state and the servers keep a mirror.

Every worker averages the gradients and steps its own optimizer, exactly as plain Horovod does,
so training is never slower for the servers' sake beyond the cost of sending. After that local
step the leader of each shard (worker ``shard.index % workers``) sends a copy of the shard's
averaged gradient to the shard's servers, as a ``PUSH`` whose base is the shard's version, and
goes on; the servers apply it to their mirror of the state (the same optimizer on the same
gradients: bit-identical to the workers' state on a CPU), replicate it down a chain or snapshot
it as the strategy says, and answer ``OK`` with the new version instead of the weights.

Guarantees:

- **Bounded lag, back-pressure.** A leader never has more than ``mirror_lag`` unanswered
  updates per shard: before sending another it waits (up to ``config.timeout``) for the oldest
  answer. A chain's head answers a tail-ack update once it is committed, so the mirror a lost
  chain keeps is at most ``mirror_lag`` steps behind the workers.
- **No gap.** A server refuses an update whose base is ahead of its version (an update went
  missing), and the worker raises ``RemoteError``: a mirror never silently skips a step.
- **Failures cost no rollback.** After any change of view (a server or a worker lost, or a
  replacement joined) the unanswered updates are dropped and the next step gives every live
  server its shard's whole state from worker 0 at the step's version (``INIT``): replacements,
  chains that lost members and shards whose leader changed all mirror the workers again. A
  rank death seen while sending is recovered from here (the step itself is complete).
- **Resume.** When every worker is lost (a relaunch after a lost node), the run resumes from
  the mirror (node copies, snapshots) with at most ``mirror_lag`` steps redone; the workers take
  the optimizer state from the servers as well as the weights.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from mpi4py import MPI

from ftmpi import wire
from ftmpi.client import ServerClient
from ftmpi.failpoints import failpoint
from ftmpi.runtime import Runtime
from ftmpi.sharding import Shard
from ftmpi.timing import PhaseTimes
from ftmpi.wire import Kind, PeerFailure

Sent = tuple[list[MPI.Request], np.ndarray]
"""An update in flight: its send requests and the copy of the gradient they read."""


class MirroredOptimizer(Protocol):
    """What :meth:`Mirror.after_step` uses of ``ftmpi.optimizer._DistributedOptimizer``."""

    _ftmpi_started: bool
    _ftmpi_shards: list[Shard]
    _ftmpi_times: PhaseTimes

    @property
    def position(self) -> int: ...

    def _start_servers(self) -> None: ...

    def _hparams(self) -> list[dict[str, Any]]: ...


def gap(version: int, base: int) -> str | None:
    """Server side: why an update on ``base`` cannot be applied to a mirror at ``version``
    (an update is missing), or None."""
    if base > version:
        return f"the update on version {base} reached a mirror at version {version}: one is missing"
    return None


class Mirror:
    """A worker's side of the mirror: the updates it sent and not yet had answered."""

    def __init__(self, rt: Runtime, client: ServerClient) -> None:
        self.rt = rt
        self.client = client
        self.unanswered: dict[int, collections.deque[Sent]] = {}
        """Per shard index: the updates sent and not yet answered, oldest first."""
        self._spare: dict[int, np.ndarray] = {}
        self._abandoned: list[Sent] = []
        self.failure: str | None = None
        """A rank death seen while sending, not yet recovered from (:meth:`raise_failure`)."""

    def after_step(self, opt: MirroredOptimizer, recover: Callable[[str], object]) -> None:
        """After this worker's own optimizer step (its position already advanced): send the
        step's averaged gradient (in ``client.grads``) to the live shards this worker leads, or,
        on the first step after the start or a recovery, give every live server its shard's
        whole state (collective over the workers; a rank death there is recovered from at
        once, ``recover``: the worker's recovery). A death seen while sending is kept
        (:attr:`failure`) and raised at the next step's start (:meth:`raise_failure`): the other
        workers are computing that step, and a recovery now would wait for them."""
        rt, client = self.rt, self.client
        with opt._ftmpi_times.phase("mirror"):
            if not opt._ftmpi_started:
                client.versions[:] = [opt.position] * len(opt._ftmpi_shards)
                try:
                    opt._start_servers()
                except PeerFailure as exc:
                    recover(str(exc))
                return
            live = [s for s in opt._ftmpi_shards if rt.live_chain(s.index)]
            mine = [s for s in live if s.index % rt.num_workers == rt.role_rank]
            try:
                client.send_hparams(mine, opt._hparams())
                self.send(mine, rt.config.mirror_lag)
            except PeerFailure as exc:
                self.failure = str(exc)

    def raise_failure(self) -> None:
        """Raise ``PeerFailure`` for a death seen while sending (:meth:`after_step`), once."""
        if self.failure is not None:
            reason, self.failure = self.failure, None
            raise PeerFailure(reason, MPI.ERR_PROC_FAILED)

    def send(self, shards: list[Shard], lag: int) -> None:
        """Send a copy of each of ``shards``' gradient with the shard's version as base; wait
        first for the oldest answer where ``lag`` are unanswered. Every shard's version then
        advances by one on this worker (the mirror's version is the step count). Raises
        ``PeerFailure``/``CommTimeout``/``RemoteError`` as any request does."""
        client = self.client
        for shard in shards:
            queue = self.unanswered.setdefault(shard.index, collections.deque())
            while len(queue) >= lag:
                self._await_oldest(shard, queue)
            g = client.view(client.grads, shard).numpy()
            spare = self._spare.pop(shard.index, None)
            buf = spare if spare is not None and spare.shape == g.shape else np.empty_like(g)
            np.copyto(buf, g)
            header = client._header(Kind.PUSH, shard, buf.nbytes, client.versions[shard.index])
            queue.append((client._isend(shard, header, buf), buf))
        if shards:
            failpoint("push")
        for shard in client.shards:
            client.versions[shard.index] += 1

    def drain(self) -> None:
        """Wait until every update this worker sent is answered: the mirrors have applied it
        (and replicated it as the strategy says). Raises as :meth:`send`."""
        for shard in self.client.shards:
            queue = self.unanswered.get(shard.index)
            while queue:
                self._await_oldest(shard, queue)

    def forget(self) -> None:
        """After a recovery: drop the unanswered updates (the servers get the workers' whole
        state instead), and a death seen while sending (the recovery covered it). Their buffers
        stay alive while an unfinished send may read them."""
        self.failure = None
        for queue in self.unanswered.values():
            self._abandoned.extend(queue)
            queue.clear()

    def progress(self) -> None:
        """While updates are in flight, let MPI move them along (Open MPI progresses a large
        send only inside MPI calls): one ``MPI_Iprobe`` for a tag nothing uses, which touches
        no request. Called from the gradient hooks during backward (:mod:`ftmpi.buckets`);
        never raises (a failure shows where the updates are awaited)."""
        if any(self.unanswered.values()):
            with contextlib.suppress(MPI.Exception):
                self.rt.world.Iprobe(MPI.ANY_SOURCE, wire.TAG_PROGRESS)

    def _await_oldest(self, shard: Shard, queue: collections.deque[Sent]) -> None:
        reqs, buf = queue[0]
        self.client._recv_reply(shard, Kind.OK, None)
        self.client._wait(reqs, "sending an update to the mirror")
        queue.popleft()
        self._spare[shard.index] = buf
