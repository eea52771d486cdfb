"""A server's snapshots of its shard: writing, listing and restoring them.

Two stores use this: the durable snapshots of ``checkpoint`` (in ``config.snapshot_dir``, named
by the server's slot, every ``checkpoint_every`` versions) and a chain server's **node copy**
(:func:`node_copy_policy`: the newest versions of its shard in node-local memory, written in
the background and skipped while the previous write is in progress, so the server never waits
for it; named by shard, since every replica of a chain holds the same state). A relaunch after
a lost node restores a chain from the node copies the launcher collected from the surviving
nodes (:func:`node_copy_sources`).

The request loop (``ftmpi.server``) answers ``SNAPSHOT``, ``SNAPSHOTS`` and ``RESTORE`` with
:meth:`SnapshotStore.write_now`, :meth:`SnapshotStore.versions` and
:meth:`SnapshotStore.restore`, and calls :meth:`SnapshotStore.after_update` after every applied
update (a snapshot every ``checkpoint_every`` versions). Writes go through a
:class:`~ftmpi.snapshot.SnapshotWriter` (in the background with ``async_checkpoint``); a write
that fails raises :class:`~ftmpi.snapshot.SnapshotError`, at once or, written in the
background, from :meth:`SnapshotStore.raise_if_failed` after the next request, so the job ends
instead of training on without durable state.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ftmpi import events
from ftmpi.config import NODE_COPIES
from ftmpi.fence import fenced_message, superseded
from ftmpi.optim_state import snapshot_class_problem
from ftmpi.replica import ShardReplica
from ftmpi.repro import rng_policy
from ftmpi.runtime import Runtime
from ftmpi.snapshot import (
    SnapshotError,
    SnapshotWriter,
    encoded_nbytes,
    incompatibility,
    lineage,
    list_versions,
    read_snapshot,
    require_room,
    snapshot_path,
)
from ftmpi.strategies import Strategy


class RestoreRefused(Exception):
    """A snapshot cannot be restored (unreadable, another shard's, incompatible); the message
    says why. The replica is left as it was."""


@dataclass(frozen=True)
class StorePolicy:
    """Where a store writes and reads, and how often."""

    directory: str
    """Where snapshots are written (empty: this store only reads)."""
    key: int
    """The number in the file names: the server's slot (``checkpoint``) or its shard."""
    every: int
    keep: int
    asynchronous: bool
    skip_when_busy: bool = False
    """A snapshot due while the previous one is still being written is skipped."""
    read_from: tuple[str, ...] = field(default=())
    """Directories whose snapshots :meth:`SnapshotStore.restore` may load (default: the one
    written to)."""
    fenced: bool = True
    """Writes are refused once a newer attempt of the run has started (:mod:`ftmpi.fence`):
    snapshots on the shared filesystem. A node copy is not fenced (node-local, and never
    gathered from a node the launcher lost), so its per-update write reads no file."""

    @property
    def sources(self) -> tuple[str, ...]:
        return self.read_from or ((self.directory,) if self.directory else ())


def checkpoint_policy(rt: Runtime, slot: int) -> StorePolicy:
    """``checkpoint``'s durable snapshots: ``config.snapshot_dir``, named by slot."""
    cfg = rt.config
    return StorePolicy(
        cfg.snapshot_dir, slot, cfg.checkpoint_every, cfg.checkpoint_keep, cfg.async_checkpoint
    )


def node_copy_sources(rt: Runtime) -> tuple[str, ...]:
    """The gathered node copies a resumed chain may restore from (every server's folder)."""
    root = os.path.join(rt.config.run_dir, NODE_COPIES)
    return tuple(sorted(glob.glob(os.path.join(glob.escape(root), "*", "slot*"))))


def node_copy_policy(rt: Runtime, slot: int) -> StorePolicy:
    """A chain server's node copy: every version, in the background, skipped while busy, the
    newest two kept, in ``config.node_copy_dir/slot<j>``, named by shard."""
    return StorePolicy(
        os.path.join(rt.config.node_copy_dir, f"slot{slot}"),
        rt.shard_of(slot),
        every=1,
        keep=2,
        asynchronous=True,
        skip_when_busy=True,
        fenced=False,
    )


def server_stores(
    rt: Runtime, slot: int, replica: ShardReplica, warn: Callable[[str], None]
) -> tuple[SnapshotStore, SnapshotStore]:
    """A server's two stores: the one it restores from (``checkpoint``'s snapshots; on a chain,
    the node copies the launcher gathered after a lost node, read only) and its node copy (a
    chain's, when ``node_copy_dir`` is set; otherwise a store that writes nothing)."""
    shard = rt.shard_of(slot)
    inert = StorePolicy("", shard, 1, 1, False)
    if not Strategy.named(rt.config.strategy).replicates:
        return SnapshotStore(rt, slot, replica, warn), SnapshotStore(rt, slot, replica, warn, inert)
    gathered = StorePolicy("", shard, 1, 1, False, read_from=node_copy_sources(rt))
    restore = SnapshotStore(rt, slot, replica, warn, gathered)
    copying = node_copy_policy(rt, slot) if rt.config.node_copy_dir else inert
    return restore, SnapshotStore(rt, slot, replica, warn, copying)


class SnapshotStore:
    """Snapshots of one server's shard, as its :class:`StorePolicy` says."""

    def __init__(
        self,
        rt: Runtime,
        slot: int,
        replica: ShardReplica,
        warn: Callable[[str], None],
        policy: StorePolicy | None = None,
    ):
        self.rt = rt
        self.slot = slot
        self.shard = rt.shard_of(slot)
        self.replica = replica
        self.warn = warn
        self.policy = policy or checkpoint_policy(rt, slot)
        self.writer: SnapshotWriter | None = None
        self.resumed_from: list[str] = []
        """Runs this shard's state descends from (sorted; not this run): a resumed
        run's later snapshots may replace theirs (see :func:`ftmpi.snapshot.lineage`)."""

    # ------------------------------------------------------------- writing

    def ensure_writer(self) -> None:
        """Create the snapshot writer once the shard's state exists, first checking that the
        checkpoint directory has room for two snapshots of the model (this shard's size times
        the shards, which share the directory); raises :class:`SnapshotError` if not."""
        if self.writer is None and self.policy.directory:
            pol = self.policy
            spec, payload = self.replica.state()
            shards = max(self.rt.num_shards, 1)
            require_room(pol.directory, shards * encoded_nbytes(spec, payload))
            self.writer = SnapshotWriter(
                pol.directory,
                pol.key,
                keep=pol.keep,
                asynchronous=pol.asynchronous,
                timeout=self.rt.config.timeout,
            )

    def submit(self) -> None:
        """Submit a snapshot of the current version (params, optimizer state, positions);
        nothing for a store that does not write (no directory)."""
        if self.writer is None:
            return
        cfg = self.rt.config
        newer = superseded(cfg.run_dir, cfg.attempt) if self.policy.fenced else None
        if newer is not None:
            raise SnapshotError(
                fenced_message(f"a snapshot to {self.policy.directory}", cfg.attempt, newer)
            )
        r = self.replica
        spec, payload = r.state()
        positions = {
            str(self.rt.worker_index(w)): p for w, p in r.positions.items() if w in self.rt.workers
        }
        meta = {
            **spec,
            "format": 1,
            "run_id": self.rt.run_id,
            "resumed_from": self.resumed_from,
            "version": r.version,
            "positions": positions,
            "rng": rng_policy(self.rt.config.seed),
        }
        self.writer.submit(r.version, meta, payload)

    def after_state_installed(self) -> None:
        """The shard's state has just been installed: write its first snapshot (and check for
        room). Raises :class:`SnapshotError` when it cannot be written."""
        self.ensure_writer()
        self.submit()

    def after_update(self) -> None:
        """After an applied update: snapshot every ``policy.every`` versions once a writer
        exists (with ``skip_when_busy``, only if the previous write is done)."""
        w = self.writer
        if w is None or self.replica.version % self.policy.every:
            return
        if self.policy.skip_when_busy and w.busy:
            return
        self.submit()

    def write_now(self) -> int:
        """Write a snapshot of the current version and return it once durable. Raises
        :class:`SnapshotError` when it cannot be written."""
        self.ensure_writer()
        assert self.writer is not None
        self.submit()
        self.writer.flush()
        return self.replica.version

    def discard(self) -> None:
        """Wait for a pending write, then delete this store's directory (a node copy once
        training is over); never raises for a directory already gone."""
        with contextlib.suppress(SnapshotError):
            self.flush()
        if self.policy.directory:
            shutil.rmtree(self.policy.directory, ignore_errors=True)

    def raise_if_failed(self) -> None:
        """Raise :class:`SnapshotError` if a background write has failed."""
        if self.writer is not None:
            self.writer.raise_if_failed()

    def flush(self) -> None:
        """Wait (within the writer's timeout) for a pending background write."""
        if self.writer is not None:
            self.writer.flush()

    # ---------------------------------------------------- listing, restoring

    def versions(self) -> list[int]:
        """The versions of this shard's snapshots that verify and belong to this state's
        lineage (any run's, before a resumed job's first restore); warns about the others."""
        cfg = self.rt.config
        self.flush()
        valid: set[int] = set()
        for directory, v in self._files():
            if v in valid:
                continue
            try:
                snap = read_snapshot(snapshot_path(directory, self.policy.key, v))
            except SnapshotError as exc:
                self.warn(f"skipping invalid snapshot: {exc}")
                continue
            # a resumed job's first restore may start from any run's snapshots (the worker
            # checks the model); later rollbacks return only to this state's own lineage
            fresh = cfg.resume and self.replica.optimizer is None
            why = None if fresh else self._foreign(snap.meta)
            if why:
                self.warn(f"skipping snapshot {snap.path}: {why}")
                continue
            valid.add(v)
        return sorted(valid)

    def _files(self) -> list[tuple[str, int]]:
        """(directory, version) of every snapshot file of this store's key it may read."""
        return [(d, v) for d in self.policy.sources for v in list_versions(d, self.policy.key)]

    def _foreign(self, meta: dict[str, Any]) -> str | None:
        """Why a verified snapshot is not one of this run's states (or of a run it resumed
        from) of this model, or None."""
        if meta.get("run_id") not in {self.rt.run_id, *self.resumed_from}:
            return f"written by run {meta.get('run_id')!r}, not this run {self.rt.run_id!r}"
        spec = self.replica.spec
        return incompatibility(meta, spec["shard"]) if spec else None

    def restore(self, version: int) -> dict[str, Any]:
        """Load this shard's snapshot of ``version`` into the replica; returns the reply for
        the worker (version, positions, shard, path). Raises :class:`RestoreRefused` when the
        snapshot cannot be used (the replica is unchanged) and :class:`SnapshotError` when a
        writer cannot be set up afterwards."""
        cfg = self.rt.config
        found = [d for d, v in self._files() if v == version]
        try:
            snap = read_snapshot(
                snapshot_path(
                    found[0] if found else self.policy.directory, self.policy.key, version
                )
            )
        except SnapshotError as exc:
            raise RestoreRefused(str(exc)) from exc
        if int(snap.meta["shard"]["index"]) != self.shard:
            raise RestoreRefused(f"{snap.path} holds shard {snap.meta['shard']['index']}")
        spec = self.replica.spec
        why = incompatibility(snap.meta, spec["shard"]) if spec else None
        why = why or snapshot_class_problem(
            snap.meta.get("optimizer"), spec["optimizer"] if spec else None
        )
        if why:
            raise RestoreRefused(f"cannot restore {snap.path}: {why}")
        r = self.replica
        r.build(snap.meta, snap.payload, version=snap.version)
        workers = self.rt.workers
        r.positions = {
            workers[int(w)]: int(p)
            for w, p in snap.meta["positions"].items()
            if int(w) < len(workers)
        }
        r.last_seq = {}
        self.resumed_from = sorted(str(x) for x in lineage(snap.meta) - {self.rt.run_id} if x)
        self.ensure_writer()
        events.emit(
            cfg.run_dir,
            "restored",
            role=f"server {self.slot}",
            version=snap.version,
            path=str(snap.path),
        )
        return {
            "version": snap.version,
            "positions": snap.meta["positions"],
            "shard": snap.meta["shard"],
            "path": str(snap.path),
        }
