"""A server's snapshots of its shard (``checkpoint``): writing, listing and restoring them.

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

from collections.abc import Callable
from typing import Any

from ftmpi import events
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


class RestoreRefused(Exception):
    """A snapshot cannot be restored (unreadable, another shard's, incompatible); the message
    says why. The replica is left as it was."""


class SnapshotStore:
    """Snapshots of one server's shard, in ``config.snapshot_dir`` under its slot's name."""

    def __init__(self, rt: Runtime, slot: int, replica: ShardReplica, warn: Callable[[str], None]):
        self.rt = rt
        self.slot = slot
        self.replica = replica
        self.warn = warn
        self.writer: SnapshotWriter | None = None
        self.resumed_from: list[str] = []
        """Runs this shard's state descends from (sorted; not this run): a resumed
        run's later snapshots may replace theirs (see :func:`ftmpi.snapshot.lineage`)."""

    # ------------------------------------------------------------- writing

    def ensure_writer(self) -> None:
        """Create the snapshot writer once the shard's state exists, first checking that the
        checkpoint directory has room for two snapshots of the model (this shard's size times
        the shards, which share the directory); raises :class:`SnapshotError` if not."""
        if self.writer is None:
            cfg = self.rt.config
            spec, payload = self.replica.state()
            shards = max(self.rt.num_shards, 1)
            require_room(cfg.snapshot_dir, shards * encoded_nbytes(spec, payload))
            self.writer = SnapshotWriter(
                cfg.snapshot_dir,
                self.slot,
                keep=cfg.checkpoint_keep,
                asynchronous=bool(cfg.async_checkpoint),
                timeout=cfg.timeout,
            )

    def submit(self) -> None:
        """Submit a snapshot of the current version (params, optimizer state, positions)."""
        assert self.writer is not None
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
        """After an applied update: snapshot every ``checkpoint_every`` versions once a writer
        exists."""
        if self.writer is not None and self.replica.version % self.rt.config.checkpoint_every == 0:
            self.submit()

    def write_now(self) -> int:
        """Write a snapshot of the current version and return it once durable. Raises
        :class:`SnapshotError` when it cannot be written."""
        self.ensure_writer()
        assert self.writer is not None
        self.submit()
        self.writer.flush()
        return self.replica.version

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
        valid = []
        for v in list_versions(cfg.snapshot_dir, self.slot):
            try:
                snap = read_snapshot(snapshot_path(cfg.snapshot_dir, self.slot, v))
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
            valid.append(v)
        return valid

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
        try:
            snap = read_snapshot(snapshot_path(cfg.snapshot_dir, self.slot, version))
        except SnapshotError as exc:
            raise RestoreRefused(str(exc)) from exc
        if int(snap.meta["shard"]["index"]) != self.slot:
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
