"""Recovery strategies: what each side does about a server's death, chosen once.

A strategy is a composition of three independent mechanisms; each module asks the
:class:`Strategy` of its run (``Strategy.named(config.strategy)``, computed once) which of them
are on, never the strategy's name:

- **snapshots** (``checkpoint``): servers write their shard to durable storage every
  ``checkpoint_every`` updates; after a server's death every rank waits for its replacement
  inside the recovery, which then loads the newest version every shard has, and the workers
  roll back to it.
- **replication** (``chain``): each shard lives on a chain of ``chain_length`` servers; the
  survivors of a chain fail over to its next member and a replacement takes the chain's state
  from a peer. Losing every member of a chain is fatal unless **rebuild** is on too.
- **rebuild** (``stateless``): while a shard has no server its workers keep training and log
  their gradients for it; the replacement is rebuilt from the workers' weights and applies the
  log (``stale_policy``).

``none`` has none of them (a server's death ends the job with a clear error);
``chain+stateless`` is replication and rebuild together: a chain fails over while it has a
member, and is rebuilt from the workers when it has none.

The two sides act on a strategy through :class:`WorkerSide` and :class:`ServerSide`, which the
worker's and the server's recovery objects implement (``ftmpi.worker_recovery``,
``ftmpi.server_recovery``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ftmpi.sharding import Shard


class StrategyName(enum.StrEnum):
    """The values of ``strategy`` (``FTMPI_STRATEGY``, ``ftmpi-run --strategy``)."""

    NONE = "none"
    CHECKPOINT = "checkpoint"
    CHAIN = "chain"
    STATELESS = "stateless"
    CHAIN_STATELESS = "chain+stateless"


@dataclass(frozen=True)
class Strategy:
    """Which recovery mechanisms a run uses; see the module docstring."""

    name: StrategyName
    snapshots: bool
    replicates: bool
    rebuilds: bool

    @classmethod
    def named(cls, name: str) -> Strategy:
        """The strategy called ``name``; ``ValueError`` for an unknown one (``Config`` checks
        first and names the valid ones)."""
        n = StrategyName(name)
        return cls(
            name=n,
            snapshots=n is StrategyName.CHECKPOINT,
            replicates=n in (StrategyName.CHAIN, StrategyName.CHAIN_STATELESS),
            rebuilds=n in (StrategyName.STATELESS, StrategyName.CHAIN_STATELESS),
        )

    @property
    def recovers_servers(self) -> bool:
        """Whether a server's death can be survived at all."""
        return self.snapshots or self.replicates or self.rebuilds

    def waits_for_replacements(self, mirrored: bool) -> bool:
        """Whether a recovery replaces down servers before anyone goes on (after their
        ``down_for``): a rollback needs every shard served (``snapshots`` in server
        placement). Otherwise the workers go on at once (a chain has failed over, stateless
        workers log, or the workers hold the state: ``mirrored``) and the coordinator has
        down servers replaced in the background (``membership.request_due_replacements``)."""
        return self.snapshots and not mirrored

    @property
    def trains_while_server_down(self) -> bool:
        """Whether workers keep computing (and log gradients) for a shard with no server."""
        return self.rebuilds

    def unrecoverable(self, failed_servers: Sequence[int], unserved_shards: Sequence[int]) -> str:
        """Why a view change cannot be survived, or ``""`` when it can. ``failed_servers``:
        servers that died in it; ``unserved_shards``: shards whose every server died (a
        replacement, if any, holds no state yet)."""
        if failed_servers and not self.recovers_servers:
            return (
                f"server(s) {list(failed_servers)} died and strategy='none' cannot recover "
                "their state; run with strategy checkpoint, chain or stateless (FTMPI_STRATEGY)"
            )
        if unserved_shards and self.replicates and not self.rebuilds:
            return (
                f"every server of shard(s) {list(unserved_shards)} died; chain replication "
                "cannot recover them: use a longer chain_length, or strategy chain+stateless to "
                "rebuild them from the workers"
            )
        return ""


class WorkerSide(Protocol):
    """What a worker does about a failure, for its run's :class:`Strategy`: a composition of
    the parts of the mechanisms that are on (``ftmpi.worker_recovery``), each hook a no-op
    for a mechanism that does not need it."""

    def live_shards(self, shards: list[Shard], position: int) -> list[Shard]:
        """Of ``shards``, those the step at data ``position`` pushes to; ``rebuilds`` logs this
        step's gradient for the others. Never blocks unless ``max_staleness`` says so (then
        ``PeerFailure`` when the replacement's recovery starts, ``TimeoutError`` past
        ``timeout + down_for``)."""
        ...

    def retry_base(self, base: Sequence[int], versions: list[int], position: int) -> list[int]:
        """Per shard, the version a step retried after a recovery pushes with: ``versions``
        (what the recovery left) adjusted, given the versions ``base`` the failed attempt
        started from (``rebuilds``, sync: a shard whose replayed log holds this step keeps
        its base, which its server answers as applied)."""
        ...

    def after_view_change(
        self, failed_servers: Sequence[int], respawned: Sequence[int], unserved: Sequence[int]
    ) -> bool:
        """Bring this worker's state in line with the new view (called once the failure is
        known to be survivable, :meth:`Strategy.unrecoverable`). ``unserved``: shards whose
        every server died. True: retry the step; False: the step is dropped (rolled back
        outside ``ftmpi.run``). Raises ``ftmpi.Rollback`` inside ``ftmpi.run`` after a
        rollback, the restore's error on every worker when a rollback cannot load a snapshot,
        and ``PeerFailure`` when another rank dies meanwhile (the caller recovers again)."""
        ...

    def wait_while_server_down(self) -> None:
        """Return once this worker may go on with every shard served: ``rebuilds`` waits for
        the replacements (``PeerFailure`` when their recovery starts, ``TimeoutError`` past
        ``timeout + down_for``); every other mechanism returns at once."""
        ...


class ServerSide(Protocol):
    """What a server does about a failure, for its run's :class:`Strategy`."""

    def recover(self, reason: str) -> None:
        """Join the survivors' recovery after a peer's death (``reason``), then run
        :meth:`after_reconfiguration`; a death during it starts it over. Returns once a pass
        completes; raises ``RuntimeError`` for a failure that cannot be survived and
        ``CommTimeout`` for a recovery that does not end in time."""
        ...

    def after_reconfiguration(self, respawned: Sequence[int]) -> None:
        """After a view change: rejoin this server's chain (``replicates``), handing state to
        or asking it from the replacements in ``respawned``. Raises ``PeerFailure`` when
        another rank dies meanwhile (the caller recovers again)."""
        ...

    def after_state_installed(self) -> None:
        """Once this server holds its shard's state from the workers or a peer: ``snapshots``
        writes the first snapshot of it (a restored snapshot is durable already); raises
        ``SnapshotError`` when it cannot be written."""
        ...
