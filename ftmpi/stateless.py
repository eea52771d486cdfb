"""Worker side of ``stateless`` (and ``chain+stateless``): training on while a shard has no server.

While every server of a shard is down, workers keep computing: the shard's gradient of each step
is added to a running sum (:class:`~ftmpi.gradlog.GradientLog`) instead of going to a server,
and the shard's weights stay as they were (the other shards keep training). In sync mode the
shard's leader (worker ``shard % W``) logs the averaged gradient; in async mode every worker
logs its own.

When the coordinator has had the replacement spawned (``down_for`` after the failure), every
worker runs :meth:`StaleTraining.rebuild`:

1. the worker holding the freshest copy of the shard (highest version; lowest rank on ties) sends
   it to the new server with a fresh optimizer state (nothing of the old server survives);
2. every worker with a non-empty log sends it, its sum under ``stale_policy``, as one update that
   advances the shard's version by the number of gradients in it; a server never applies the same
   log twice (its last sequence number is remembered);
3. every worker pulls the rebuilt shard, so all hold the same weights again; only then is its
   log dropped (a rebuild cut short by another death is done again, see
   :meth:`StaleTraining.rebuild`).

With ``max_staleness = K`` a worker that has logged K gradients for a down shard stops and waits
for the replacement instead of logging more.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from ftmpi import events
from ftmpi.gradlog import GradientLog
from ftmpi.membership import request_due_replacements
from ftmpi.sharding import Shard
from ftmpi.wire import PeerFailure, wait_all

if TYPE_CHECKING:
    from ftmpi.client import ServerClient
    from ftmpi.runtime import Runtime

_WAKE_TAG = 7099  # never sent: probing it only notices a revoked communicator


class StaleTraining:
    """This worker's gradient logs and the rebuild protocol; see the module docstring."""

    def __init__(self, rt: Runtime, client: ServerClient) -> None:
        self.rt = rt
        self.client = client
        cfg = rt.config
        self.logs = {
            s.index: GradientLog(s.index, s.numel, client.dtype, str(cfg.stale_policy))
            for s in client.shards
        }
        self.down_at: dict[int, int] = {}
        """Shard -> data position of the first step it had no server."""
        self.logged = 0
        """Gradients logged by this worker over the run."""
        self.replayed = 0
        """Gradients of this worker's logs acknowledged by a replacement."""
        self.unfinished: set[int] = set()
        """Shards whose rebuild this worker started and has not finished (pulled)."""
        self.replayed_into: dict[int, int] = {}
        """Shard -> the server version that acknowledged this worker's (still kept) log."""
        self.replayed_through: dict[int, int] = {}
        """Shard -> the last data position replayed by its latest rebuild (-1: none), the same
        on every worker."""

    def down(self, shards: list[Shard]) -> list[Shard]:
        """The shards among ``shards`` that have no live server."""
        return [s for s in shards if not self.rt.live_chain(s.index)]

    def log(self, shards: list[Shard], position: int) -> None:
        """Log this step's gradient of each down shard (once per data position, so a retried
        step does not log twice). Waits for the replacement past ``max_staleness``."""
        rt = self.rt
        sync = rt.config.mode == "sync"
        for shard in shards:
            first = self.down_at.setdefault(shard.index, position)
            if rt.config.max_staleness and position - first >= rt.config.max_staleness:
                self.wait_for_replacement(shard)
            if sync and shard.index % rt.num_workers != rt.role_rank:
                continue
            log = self.logs[shard.index]
            if log.count and log.last_seq == position:
                continue
            log.append(self.client.view(self.client.grads, shard), seq=position, step=position)
            self.logged += 1

    def wait_for_replacement(self, shard: Shard) -> None:
        """Block until a recovery starts (the coordinator revokes the world once the down time
        has passed); raises ``PeerFailure`` so the step joins it and is retried."""
        rt = self.rt
        deadline = time.monotonic() + rt.config.timeout + rt.config.down_for
        events.emit(
            rt.config.run_dir,
            "staleness_wait",
            role=f"worker {rt.role_rank}",
            shard=shard.index,
            max_staleness=rt.config.max_staleness,
        )
        while time.monotonic() < deadline:
            request_due_replacements(rt)
            try:
                rt.world.Iprobe(source=MPI.ANY_SOURCE, tag=_WAKE_TAG)
            except MPI.Exception as exc:
                raise PeerFailure("waiting for a replacement", exc.Get_error_class()) from exc
            time.sleep(0.01)
        raise TimeoutError(
            f"shard {shard.index} had no server for longer than timeout + down_for "
            f"({rt.config.timeout + rt.config.down_for:g} s) while this worker waited at "
            f"max_staleness={rt.config.max_staleness}"
        )

    def rebuild(self, shards: list[Shard], optimizer: str, groups: list[dict[str, Any]]) -> None:
        """Rebuild ``shards`` on their new servers (every worker calls this; collective).

        A log is kept until this worker has pulled the rebuilt shard, and a replay's reply
        does not change this worker's weights or versions: until the pull, every worker
        holds the weights it had before the rebuild. So a rebuild cut short (the new server
        dying before the pulls) can be done again on the next replacement: the source is
        again the freshest worker, and a log is replayed again unless the source's weights
        already hold it (a worker that pulled after every replay)."""
        rt = self.rt
        assert rt.backend is not None
        for shard in shards:
            versions = np.zeros(rt.num_workers, dtype=np.int64)
            mine = np.array([self.client.versions[shard.index]], dtype=np.int64)
            wait_all(
                [rt.group.Iallgather(mine, versions)], rt.config.timeout, "agreeing on versions"
            )
            source = int(np.argmax(versions))  # lowest rank among the freshest
            if rt.role_rank == source:
                self.client.init_servers(optimizer, groups, {}, [shard])
            rt.backend.barrier()
            self.unfinished.add(shard.index)  # past the barrier: the new server has the shard
            log = self.logs[shard.index]
            last = np.array([log.last_seq], dtype=np.int64)
            into = self.replayed_into.get(shard.index)
            if log.count and (into is None or int(versions[source]) < into):
                self._replay(shard, log)
            self.replayed_through[shard.index] = int(last[0])  # known here even if the next fails
            wait_all(
                [rt.group.Iallreduce(MPI.IN_PLACE, last, op=MPI.MAX)],
                rt.config.timeout,
                "agreeing on the replayed positions",
            )
            self.replayed_through[shard.index] = int(last[0])
            self.client.pull([shard])
            self._finished(shard)

    def finish_rebuilds(self, alive: list[Shard]) -> None:
        """After a recovery that respawned none of them: finish this worker's rebuilds of the
        ``alive`` shards that a failure cut short after their new server was initialised
        (send the log again if its replay was not acknowledged: the server applies a log
        once; then pull). Not collective."""
        for shard in alive:
            if shard.index not in self.unfinished:
                continue
            log = self.logs[shard.index]
            if log.count and shard.index not in self.replayed_into:
                self._replay(shard, log)
            self.client.pull([shard])
            self._finished(shard)

    def _replay(self, shard: Shard, log: GradientLog) -> None:
        combined = log.combine()
        self.replayed_into[shard.index] = self.client.replay(shard, combined)
        events.emit(
            self.rt.config.run_dir,
            "log_replayed",
            role=f"worker {self.rt.role_rank}",
            shard=shard.index,
            count=combined.count,
            policy=self.rt.config.stale_policy,
            lr_scale=combined.lr_scale,
        )

    def _finished(self, shard: Shard) -> None:
        """The rebuilt ``shard`` is pulled: its log (if any) is in the weights this worker holds."""
        log = self.logs[shard.index]
        self.replayed += log.count
        log.clear()
        self.replayed_into.pop(shard.index, None)
        self.unfinished.discard(shard.index)
        self.down_at.pop(shard.index, None)
