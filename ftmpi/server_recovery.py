"""A server's side of a recovery: the one owner of its sequence and retry loop.

When a peer dies (``PeerFailure`` in the request loop) the server calls
:meth:`ServerRecovery.recover`, which runs, until one pass completes without another death:

1. ``membership.recover``: the survivors agree on the failure, shrink the world (per-worker
   bookkeeping is renumbered at once, ``renumber``), and replacements join;
2. the strategy's hook, :meth:`ServerRecovery.after_reconfiguration`: with ``replicates``, the
   chain is rejoined (``ChainLink.reconfigure``) and a server without state asks its
   predecessor for it.

With ``snapshots``, :meth:`ServerRecovery.after_state_installed` writes the first snapshot
of a state once it is installed (from the workers' INIT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ftmpi import wire
from ftmpi.chain import ChainLink
from ftmpi.membership import recover
from ftmpi.runtime import Runtime
from ftmpi.snapshot_store import SnapshotStore
from ftmpi.strategies import ServerSide, Strategy


class ServerRecovery(ServerSide):
    """The :class:`ftmpi.strategies.ServerSide` of one server rank."""

    def __init__(
        self,
        rt: Runtime,
        strategy: Strategy,
        link: ChainLink | None,
        store: SnapshotStore,
        renumber: Callable[[dict[int, int]], None],
    ) -> None:
        self.rt = rt
        self.strategy = strategy
        self.link = link
        """This server's chain link (``replicates``), or None."""
        self.store = store
        self.renumber = renumber
        """Called with ``{old rank: new rank}`` as soon as the world has shrunk."""

    def recover(self, reason: str) -> None:
        """Join the survivors' recovery after a peer's death (``reason`` says which), then run
        the strategy's hook. A death during the recovery itself (e.g. a chain neighbour dying
        while this server reconfigures) starts it over, as on the workers; returns once a pass
        completes. Raises what ``membership.recover`` raises for a failure that cannot be
        survived (``RuntimeError``) or a recovery that does not end in time
        (``CommTimeout``)."""
        while True:
            try:
                result = recover(
                    self.rt,
                    blocking_strategy=self.strategy.waits_for_replacements(self.rt.config.mirrored),
                    reason=reason,
                    on_shrink=self.renumber,
                )
                self.after_reconfiguration(result.respawned)
                return
            except wire.PeerFailure as exc:
                reason = str(exc)

    def after_reconfiguration(self, respawned: Sequence[int]) -> None:
        """Rejoin this server's chain (``replicates``) in the new view, handing state to or
        asking it from the replacements in ``respawned``; nothing otherwise. Raises
        ``PeerFailure`` when another rank dies meanwhile."""
        if self.link is not None:
            self.link.reconfigure(list(respawned))
            self.link.ask_for_state()

    def after_state_installed(self) -> None:
        """Once this server holds its shard's state (from the workers or a peer):
        ``snapshots`` writes the first snapshot of it (raises ``SnapshotError`` when that
        fails); nothing otherwise."""
        if self.strategy.snapshots:
            self.store.after_state_installed()
