"""The parameter server: owns one shard's weights and optimizer state, applies pushed gradients.

A server rank sits in :meth:`ParameterServer.serve` from ``ftmpi.init()`` until every worker has
sent STOP. It answers requests one at a time, in arrival order:

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

Messages from another run (header run id) are drained and counted as dropped, never applied.
The server's weights are a flat buffer; its ``torch`` parameters are views into it, so a reply
sends the buffer with no copy, and the optimizer is the worker's optimizer class run on the
same tensors a single process would hold: identical inputs give bit-identical results.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from ftmpi import events, failpoints, wire
from ftmpi.chain import READY_FOR_STATE, ChainLink, Update
from ftmpi.faults import Injector, parse_schedule
from ftmpi.optim_state import (
    apply_hparams,
    build_optimizer,
    dtype_of,
    group_hparams,
    load_state_entries,
    pack_tensors,
    payload_nbytes,
    snapshot_class_problem,
    state_entries,
    table_segments,
    tensor_segments,
    unpack_tensors,
)
from ftmpi.repro import rng_policy
from ftmpi.resources import peak_rss_bytes
from ftmpi.runtime import Runtime
from ftmpi.sharding import Shard
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
from ftmpi.wire import Header, Kind


class ParameterServer:
    """One server rank's state and request loop."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.index = rt.server_index
        """This server's slot."""
        self.shard_index = rt.shard_of(self.index)
        """The shard this server holds (its chain's shard)."""
        self.shard: Shard | None = None
        self.weights: torch.Tensor | None = None
        self.grads: torch.Tensor | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: dict[str, torch.Tensor] = {}
        self.version = 0
        self.stopped: set[int] = set()
        self.applied = 0
        """Gradients applied (a replayed log counts every gradient in it)."""
        self.replayed = 0
        """Gradients applied from workers' logs (``stateless``)."""
        self.staleness_sum = 0
        self.staleness_max = 0
        self.dropped = 0
        self.apply_seconds = 0.0
        self.positions: dict[int, int] = {}
        """World rank of a worker -> its data position after its last applied push."""
        self.last_seq: dict[int, int] = {}
        """World rank of a worker -> sequence number of its last applied push (async dedup)."""
        self.spec: dict[str, Any] = {}
        self.writer: SnapshotWriter | None = None
        self.resumed_from: list[str] = []
        """Runs this shard's state descends from (sorted; not this run): a resumed
        run's later snapshots may replace theirs (see :func:`ftmpi.snapshot.lineage`)."""
        self.link = ChainLink(self) if rt.config.chained else None
        self.receive_buffer: np.ndarray | None = None
        """A mapped buffer for an expected state transfer (chain replacement, ``STATE_SIZE``)."""
        self.buffer_seconds = 0.0
        """Seconds it took to map ``receive_buffer``."""
        self.new_hparams: list[dict[str, Any]] | None = None
        """Hyper-parameters received since the last update (forwarded down a chain with it)."""
        self.injector = Injector(
            parse_schedule(rt.config.kill),
            "server",
            self.index,
            rt.incarnations[self.index],
            rt.job_start,
            run_dir=rt.config.run_dir,
            chain_position=self._chain_position,
        )
        failpoints.arm(
            failpoints.parse_failpoints(rt.config.failpoints),
            "server",
            self.index,
            rt.incarnations[self.index],
            run_dir=rt.config.run_dir,
            chain_position=self._chain_position,
        )
        torch.set_num_threads(rt.config.server_threads)

    def _chain_position(self) -> tuple[int, bool, bool]:
        """(shard, is head, is tail) of this server now, for ``head``/``tail`` kill specs."""
        live = self.rt.live_chain(self.shard_index)
        return self.shard_index, live[:1] == [self.index], live[-1:] == [self.index]

    # ----------------------------------------------------------------- loop

    def serve(self) -> None:
        """Answer requests until every worker has sent STOP.

        Raises :class:`~ftmpi.wire.CommTimeout` if no request arrives for
        ``config.server_idle_timeout`` seconds, and :class:`~ftmpi.wire.PeerFailure` if a peer dies.
        Raises :class:`~ftmpi.snapshot.SnapshotError` when a snapshot cannot be written (or,
        written in the background, has failed by the end of the next request), so the job
        ends instead of training on without durable state.
        """
        cfg = self.rt.config
        handlers = {
            Kind.INIT: self._on_init,
            Kind.PUSH: self._on_push,
            Kind.PULL: self._on_pull,
            Kind.HPARAMS: self._on_hparams,
            Kind.STATS: self._on_stats,
            Kind.STATE: self._on_state,
            Kind.STOP: self._on_stop,
            Kind.SNAPSHOTS: self._on_snapshots,
            Kind.RESTORE: self._on_restore,
            Kind.FORWARD: self._on_forward,
            Kind.ACK: self._on_ack,
            Kind.CHAIN_STOP: self._on_chain_stop,
            Kind.REPLAY: self._on_replay,
            Kind.SNAPSHOT: self._on_snapshot,
            Kind.STATE_SIZE: self._on_state_size,
        }
        if self.link is not None and self.rt.incarnations[self.index] > 0:
            self.link.ask_for_state()
        while not self._done():
            try:
                header, src = wire.recv_header(
                    self.rt.world,
                    wire.ANY_SOURCE,
                    tag=wire.TAG_HEADER,
                    timeout=cfg.server_idle_timeout,
                    what=f"server {self.index} waiting for requests",
                    polling=self._idle_polling(),
                )
                handler = (
                    handlers.get(Kind(header.kind))
                    if header.kind in Kind._value2member_map_
                    else None
                )
                if header.run != self.rt.run or header.view != self.rt.view or handler is None:
                    self._drop(header, src)
                    continue
                handler(header, src)
                if self.writer is not None:  # a failed background write ends the job now
                    self.writer.raise_if_failed()
            except wire.PeerFailure as exc:
                if set(self.rt.workers) <= self.stopped:
                    # training is over and the workers are leaving: they will not join a
                    # recovery, so waiting for one would hang the job at exit
                    self._warn(f"a peer died after every worker stopped; not recovering: {exc}")
                    break
                self._recover(str(exc))
        if self.writer is not None:
            self.writer.flush()

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
        if self.link.is_head and self.link.unsent:
            self.link.flush()
        if not self.link.drained():
            return False
        self.link.stop_successor()
        return True

    def _recover(self, reason: str) -> None:
        """Join the survivors' recovery; keep per-worker bookkeeping under the new ranks. A
        death during the recovery itself (e.g. a chain neighbour dying while this server
        reconfigures) starts it over, as on the workers."""
        from ftmpi.membership import recover

        while True:
            try:
                result = recover(
                    self.rt,
                    blocking_strategy=self.rt.config.strategy == "checkpoint",
                    reason=reason,
                    on_shrink=self._renumber,
                )
                if self.link is not None:
                    self.link.reconfigure(result.respawned)
                    self.link.ask_for_state()
                return
            except wire.PeerFailure as exc:
                reason = str(exc)

    def _renumber(self, remap: dict[int, int]) -> None:
        """Keep per-worker bookkeeping under the ranks of the shrunk world."""
        self.stopped = {remap[r] for r in self.stopped if r in remap}
        self.positions = {remap[r]: p for r, p in self.positions.items() if r in remap}
        self.last_seq = {remap[r]: q for r, q in self.last_seq.items() if r in remap}
        if self.link is not None:
            self.link.renumber(remap)

    def _drop(self, header: Header, src: int) -> None:
        """Drain and discard a message that must not be applied (wrong run, unknown kind)."""
        if header.nbytes > 0:
            self._recv(src, np.empty(header.nbytes, dtype=np.uint8), "a dropped message")
        self.dropped += 1

    # ------------------------------------------------------------ transport

    def _recv(self, src: int, out: wire.Payload, what: str, *, bulk: bool = False) -> None:
        chunk = self.rt.config.chunk_bytes
        wire.recv_payload(
            self.rt.world,
            src,
            out,
            data_tag=wire.TAG_DATA,
            chunk_bytes=wire.bulk_chunk_bytes(chunk) if bulk else chunk,
            timeout=self.rt.config.timeout,
            what=f"server {self.index} receiving {what} from rank {src}",
        )

    def _reply(self, dest: int, kind: Kind, payload: np.ndarray | None, aux: int = 0) -> None:
        nbytes = 0 if payload is None else payload.nbytes
        header = Header(kind, self.rt.run, self.version, self.index, 0, self.rt.view, nbytes, aux)
        wire.send(
            self.rt.world,
            dest,
            header,
            payload,
            tag=wire.TAG_REPLY,
            data_tag=wire.TAG_REPLY_DATA,
            chunk_bytes=self.rt.config.chunk_bytes,
            timeout=self.rt.config.timeout,
            what=f"server {self.index} replying to rank {dest}",
        )

    def _reply_error(self, dest: int, message: str) -> None:
        self._reply(dest, Kind.ERROR, wire.encode_json({"error": message}))

    def _weights_bytes(self) -> np.ndarray:
        assert self.weights is not None
        return self.weights.numpy()

    # ------------------------------------------------------------- handlers

    def _on_init(self, header: Header, src: int) -> None:
        spec: dict[str, Any] = wire.decode_json(self._recv_json(header, src))
        t0 = time.perf_counter()
        nbytes = int(spec["binary_nbytes"])
        prepared, self.receive_buffer = self.receive_buffer, None
        mapped = prepared is not None and prepared.nbytes == nbytes
        binary = prepared if prepared is not None and mapped else np.empty(nbytes, np.uint8)
        segments = table_segments(spec.get("state_table", []), binary, lead=_weights_nbytes(spec))
        t1 = time.perf_counter()
        self._recv(src, segments, "initial weights", bulk=True)
        if src not in self.rt.workers:  # a chain predecessor's state transfer
            events.emit(
                self.rt.config.run_dir,
                "state_received",
                role=f"server {self.index}",
                nbytes=nbytes,
                mapped_first=mapped,
                map_seconds=round(self.buffer_seconds, 6) if mapped else 0.0,
                alloc_seconds=round(t1 - t0, 6),
                seconds=round(time.perf_counter() - t1, 6),
            )
        if int(spec["shard"]["index"]) != self.shard_index:
            self._reply_error(
                src,
                f"server {self.index} holds shard {self.shard_index}, not {spec['shard']['index']}",
            )
            return
        self._build(spec, binary, version=int(header.version))
        self.last_seq = {int(r): q for r, q in spec.get("last_seq", {}).items()}
        if self.link is not None:
            self.link.committed = self.version
            succ = self.link.succ
            if succ is not None:
                self.link.hand_over_state(succ)
        if self.rt.config.strategy == "checkpoint":
            self._ensure_writer()
            self._snapshot()
        if src in self.rt.workers:
            self._reply(src, Kind.OK, None)

    def _on_state_size(self, header: Header, src: int) -> None:
        """A chain predecessor will send this replacement ``header.aux`` bytes of state: map a
        buffer for them, then ask for the state (see :mod:`ftmpi.chain`)."""
        assert self.link is not None
        if self.grads is not None:  # the state came another way meanwhile
            return
        nbytes = int(header.aux)
        if self.receive_buffer is None or self.receive_buffer.nbytes != nbytes:
            t0 = time.perf_counter()
            self.receive_buffer = wire.mapped_buffer(nbytes)
            self.buffer_seconds = time.perf_counter() - t0
        self.link.ask_for_state(READY_FOR_STATE)

    def _build(self, spec: dict[str, Any], binary: np.ndarray, *, version: int) -> None:
        """(Re)create the shard's tensors and optimizer from ``spec`` and ``binary`` (weights,
        then the optimizer state laid out by ``spec["state_table"]``). A writable ``binary``
        becomes the shard's memory (no copy); the caller must not reuse it."""
        shard = Shard.from_json(spec["shard"])
        dtype = dtype_of(spec["dtype"])
        wbytes = _weights_nbytes(spec)
        weights = binary[:wbytes] if binary.flags.writeable else binary[:wbytes].copy()
        self.weights = torch.from_numpy(weights).view(dtype)
        self.grads = torch.zeros_like(self.weights)
        params: dict[str, torch.Tensor] = {}
        by_group: list[list[torch.Tensor]] = [[] for _ in spec["groups"]]
        for slot in shard.slots:
            view = self.weights[slot.offset : slot.offset + slot.numel].view(slot.shape)
            p = torch.nn.Parameter(view)
            p.grad = self.grads[slot.offset : slot.offset + slot.numel].view(slot.shape)
            params[slot.name] = p
            by_group[slot.group].append(p)
        self.optimizer = build_optimizer(spec["optimizer"], spec["groups"], by_group)
        self.params = params
        state = unpack_tensors(spec.get("state_table", []), binary[wbytes:], copy=False)
        load_state_entries(self.optimizer, params, state, spec.get("state_scalars", {}))
        self.shard = shard
        self.spec = {k: spec[k] for k in ("shard", "optimizer", "groups", "dtype")}
        self.version = version

    def _state(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The shard's whole state: a JSON-able spec (layout, optimizer, current hyper-parameters,
        state table) and the bytes it describes as segments (weights, then each optimizer-state
        tensor), views of the live tensors: valid until the next update is applied."""
        assert self.optimizer is not None and self.weights is not None
        tensors, scalars = state_entries(self.optimizer, {p: n for n, p in self.params.items()})
        table, views = tensor_segments(tensors)
        spec = {
            **self.spec,
            "groups": [group_hparams(g) for g in self.optimizer.param_groups],
            "state_table": table,
            "state_scalars": scalars,
        }
        return spec, [self._weights_bytes(), *views]

    def state_nbytes(self) -> int:
        """Bytes of the shard's whole state as :meth:`transfer_state` sends it."""
        return payload_nbytes(self._state()[1])

    def transfer_state(self, slot: int, *, waited: float = 0.0) -> None:
        """Send the whole shard state to server ``slot`` (a chain successor that has none).

        The weights and each optimizer-state tensor are sent in place, as segments (no copy;
        nothing is applied until the send completes). The ``state_transfer`` event records the
        bytes, ``pack_seconds`` (describing the state), ``seconds`` (from the first send to the
        completion of the last) and ``waited`` (the seconds the successor took to ask for it)."""
        t0 = time.perf_counter()
        spec, segments = self._state()
        nbytes = payload_nbytes(segments)
        spec = {
            **spec,
            "binary_nbytes": nbytes,
            "last_seq": {str(r): q for r, q in self.last_seq.items()},
        }
        doc = wire.encode_json(spec)
        cfg = self.rt.config
        dest = self.rt.server_world_rank(slot)
        what = f"server {self.index} sending its state to server {slot}"
        header = Header(
            Kind.INIT, self.rt.run, self.version, self.shard_index, 0, self.rt.view, doc.nbytes
        )
        t1 = time.perf_counter()
        reqs = wire.isend_request(
            self.rt.world,
            dest,
            header,
            doc,
            segments,
            chunk_bytes=cfg.chunk_bytes,
            data_chunk_bytes=wire.bulk_chunk_bytes(cfg.chunk_bytes),
            what=what,
        )
        failpoints.failpoint("state_transfer")
        wire.wait_all(reqs, cfg.timeout, what)
        events.emit(
            cfg.run_dir,
            "state_transfer",
            role=f"server {self.index}",
            to=f"server {slot}",
            version=self.version,
            nbytes=nbytes,
            pack_seconds=round(t1 - t0, 6),
            seconds=round(time.perf_counter() - t1, 6),
            waited=round(waited, 6),
        )

    # ------------------------------------------------------------ snapshots

    def _snapshot(self) -> None:
        """Submit a snapshot of the current version (params, optimizer state, positions)."""
        assert self.writer is not None
        spec, payload = self._state()
        positions = {
            str(self.rt.worker_index(r)): p
            for r, p in self.positions.items()
            if r in self.rt.workers
        }
        meta = {
            **spec,
            "format": 1,
            "run_id": self.rt.run_id,
            "resumed_from": self.resumed_from,
            "version": self.version,
            "positions": positions,
            "rng": rng_policy(self.rt.config.seed),
        }
        self.writer.submit(self.version, meta, payload)

    def _ensure_writer(self) -> None:
        """Create the snapshot writer once the shard's state exists, first checking that the
        checkpoint directory has room for two snapshots of the model (this shard's size times
        the shards, which share the directory); raises :class:`SnapshotError` if not."""
        if self.writer is None:
            cfg = self.rt.config
            spec, payload = self._state()
            shards = max(self.rt.num_shards, 1)
            require_room(cfg.snapshot_dir, shards * encoded_nbytes(spec, payload))
            self.writer = SnapshotWriter(
                cfg.snapshot_dir,
                self.index,
                keep=cfg.checkpoint_keep,
                asynchronous=bool(cfg.async_checkpoint),
                timeout=cfg.timeout,
            )

    def _on_snapshot(self, header: Header, src: int) -> None:
        """Write a snapshot of the current version now and reply once it is durable."""
        if self.optimizer is None:
            self._reply_error(src, f"server {self.index} has no state yet (no INIT)")
            return
        self._ensure_writer()
        assert self.writer is not None
        self._snapshot()
        self.writer.flush()
        self._reply(src, Kind.JSON, wire.encode_json({"version": self.version}))

    def _on_snapshots(self, header: Header, src: int) -> None:
        """Reply with the versions of this shard's snapshots that verify."""
        cfg = self.rt.config
        if self.writer is not None:
            self.writer.flush()
        valid = []
        for v in list_versions(cfg.snapshot_dir, self.index):
            try:
                snap = read_snapshot(snapshot_path(cfg.snapshot_dir, self.index, v))
            except SnapshotError as exc:
                self._warn(f"skipping invalid snapshot: {exc}")
                continue
            # a resumed job's first restore may start from any run's snapshots (the worker
            # checks the model); later rollbacks return only to this state's own lineage
            why = None if cfg.resume and self.optimizer is None else self._foreign(snap.meta)
            if why:
                self._warn(f"skipping snapshot {snap.path}: {why}")
                continue
            valid.append(v)
        self._reply(src, Kind.JSON, wire.encode_json({"versions": valid}))

    def _foreign(self, meta: dict[str, Any]) -> str | None:
        """Why a verified snapshot is not one of this run's states (or of a run it resumed
        from) of this model, or None."""
        if meta.get("run_id") not in {self.rt.run_id, *self.resumed_from}:
            return f"written by run {meta.get('run_id')!r}, not this run {self.rt.run_id!r}"
        return incompatibility(meta, self.spec["shard"]) if self.spec else None

    def _on_restore(self, header: Header, src: int) -> None:
        """Load this shard's snapshot of version ``header.version``; reply with its positions."""
        cfg = self.rt.config
        try:
            snap = read_snapshot(snapshot_path(cfg.snapshot_dir, self.index, header.version))
        except SnapshotError as exc:
            self._reply_error(src, str(exc))
            return
        if int(snap.meta["shard"]["index"]) != self.index:
            self._reply_error(src, f"{snap.path} holds shard {snap.meta['shard']['index']}")
            return
        why = incompatibility(snap.meta, self.spec["shard"]) if self.spec else None
        why = why or snapshot_class_problem(
            snap.meta.get("optimizer"), self.spec["optimizer"] if self.spec else None
        )
        if why:
            self._reply_error(src, f"cannot restore {snap.path}: {why}")
            return
        self._build(snap.meta, snap.payload, version=snap.version)
        workers = self.rt.workers
        self.positions = {
            workers[int(w)]: int(p)
            for w, p in snap.meta["positions"].items()
            if int(w) < len(workers)
        }
        self.last_seq = {}
        self.resumed_from = sorted(str(r) for r in lineage(snap.meta) - {self.rt.run_id} if r)
        self._ensure_writer()
        events.emit(
            cfg.run_dir,
            "restored",
            role=f"server {self.index}",
            version=snap.version,
            path=str(snap.path),
        )
        self._reply(
            src,
            Kind.JSON,
            wire.encode_json(
                {
                    "version": snap.version,
                    "positions": snap.meta["positions"],
                    "shard": snap.meta["shard"],
                    "path": str(snap.path),
                }
            ),
        )

    def _warn(self, message: str) -> None:
        print(f"ftmpi server {self.index}: warning: {message}", file=sys.stderr, flush=True)
        events.emit(self.rt.config.run_dir, "warning", role=f"server {self.index}", message=message)

    def _recv_json(self, header: Header, src: int) -> np.ndarray:
        buf = np.empty(header.nbytes, dtype=np.uint8)
        self._recv(src, buf, "a JSON document")
        return buf

    def _on_push(self, header: Header, src: int) -> None:
        if self.grads is None or self.optimizer is None:
            self._drop(header, src)
            self._reply_error(src, f"server {self.index} got a gradient before INIT")
            return
        grad_bytes = self.grads.numpy()
        if header.nbytes != grad_bytes.nbytes or header.shard != self.shard_index:
            self._drop(header, src)
            self._reply_error(
                src,
                f"server {self.index}: gradient for shard {header.shard} "
                f"with {header.nbytes} bytes does not match this shard "
                f"({grad_bytes.nbytes} bytes)",
            )
            return
        self._recv(src, grad_bytes, "a gradient")
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
        doc = wire.decode_json(self._recv_json(header, src))
        if self.grads is None:
            raise RuntimeError(f"server {self.index} got a gradient log before its shard state")
        grad_bytes = self.grads.numpy()
        self._recv(src, grad_bytes, "a folded gradient log")
        if doc["last_seq"] <= self.last_seq.get(src, -1):
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
            self.apply_update(update, loaded=True)
            self._answer(src)
            return
        update.grad = self.link.keep(update.grad)
        self.link.submit(update, lambda: self.apply_update(update, loaded=True), src, early=early)

    def apply_update(self, u: Update, *, loaded: bool = False) -> None:
        """Apply one update (a gradient and the hyper-parameters in force for it). ``loaded``:
        the optimizer's gradient buffer already holds ``u``'s gradient (it was received there),
        so it is not copied in again."""
        assert self.optimizer is not None and self.grads is not None
        grad_bytes = self.grads.numpy().view(np.uint8).reshape(-1)
        if not loaded and u.grad.ctypes.data != grad_bytes.ctypes.data:
            grad_bytes[:] = u.grad.view(np.uint8).reshape(-1)
        if u.hparams is not None:
            apply_hparams(self.optimizer, u.hparams)
        lrs = [g.get("lr") for g in self.optimizer.param_groups]
        if u.lr_scale != 1.0:
            for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr * u.lr_scale
        t0 = time.perf_counter()
        self.optimizer.step()
        self.apply_seconds += time.perf_counter() - t0
        if u.lr_scale != 1.0:
            for g, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
        self.version = u.version
        failpoints.failpoint("apply")
        self.applied += u.count
        if u.replay:
            self.replayed += u.count
        if u.src >= 0:
            self.positions[u.src] = u.seq + 1
            self.last_seq[u.src] = u.seq
        if self.writer is not None and self.version % self.rt.config.checkpoint_every == 0:
            self._snapshot()

    def _answer(self, src: int) -> None:
        """Reply to a push with the current weights: now, or (on a chain) once the ack mode
        covers this server's version."""
        if self.link is None:
            self.reply_weights(src)
        else:
            self.link.hold(src, self.version)

    def reply_weights(self, dest: int) -> None:
        self._reply(dest, Kind.WEIGHTS, self._weights_bytes())

    def _on_forward(self, header: Header, src: int) -> None:
        assert self.link is not None
        self.link.on_forward(header, src, lambda out, what: self._recv(src, out, what))
        self.injector.at_step(self.version)

    def _on_ack(self, header: Header, src: int) -> None:
        assert self.link is not None
        self.link.on_ack(header)

    def _on_chain_stop(self, header: Header, src: int) -> None:
        assert self.link is not None
        self.link.pred_stopped = True

    def _already_applied(self, header: Header, src: int) -> bool:
        """A push retried after a recovery that the server had applied before: in sync mode its
        base version is behind the server's; in async mode its sequence number is not new."""
        if self.rt.config.mode == "sync":
            return header.version < self.version
        return header.seq <= self.last_seq.get(src, -1)

    def _on_pull(self, header: Header, src: int) -> None:
        if self.weights is None:
            self._reply_error(src, f"server {self.index} has no weights yet (no INIT)")
            return
        self._reply(src, Kind.WEIGHTS, self._weights_bytes())

    def _on_hparams(self, header: Header, src: int) -> None:
        groups = wire.decode_json(self._recv_json(header, src))
        if self.optimizer is not None:
            apply_hparams(self.optimizer, groups)
            self.new_hparams = groups

    def _on_stats(self, header: Header, src: int) -> None:
        self._reply(src, Kind.JSON, wire.encode_json(self.stats()))

    def _on_state(self, header: Header, src: int) -> None:
        if self.optimizer is None:
            self._reply_error(src, f"server {self.index} has no optimizer yet (no INIT)")
            return
        tensors, scalars = state_entries(self.optimizer, {p: n for n, p in self.params.items()})
        table, buf = pack_tensors(tensors)
        doc = {"table": table, "scalars": scalars, "binary_nbytes": int(buf.nbytes)}
        self._reply(src, Kind.JSON, wire.encode_json(doc))
        wire.wait_all(
            wire.isend_data(
                self.rt.world,
                src,
                buf,
                data_tag=wire.TAG_REPLY_DATA,
                chunk_bytes=self.rt.config.chunk_bytes,
                what="sending state",
            ),
            self.rt.config.timeout,
            f"server {self.index} sending optimizer state to rank {src}",
        )

    def _on_stop(self, header: Header, src: int) -> None:
        self.stopped.add(src)

    def stats(self) -> dict[str, Any]:
        """Counters since start: updates applied, staleness, dropped messages, apply time,
        peak resident memory (bytes)."""
        return {
            "server": self.index,
            "version": self.version,
            "applied": self.applied,
            "replayed": self.replayed,
            "staleness_mean": self.staleness_sum / self.applied if self.applied else 0.0,
            "staleness_max": self.staleness_max,
            "dropped": self.dropped,
            "apply_seconds": self.apply_seconds,
            "numel": 0 if self.shard is None else self.shard.numel,
            "in_horovod": _in_horovod(),
            "peak_rss": peak_rss_bytes(),
        }


def _in_horovod() -> bool:
    """Whether this process has joined Horovod (a server never should)."""
    hvd = sys.modules.get("horovod.torch")
    return bool(hvd is not None and hvd.is_initialized())


def _weights_nbytes(spec: dict[str, Any]) -> int:
    """Bytes of the weights at the start of an INIT payload described by ``spec``."""
    return Shard.from_json(spec["shard"]).numel * dtype_of(spec["dtype"]).itemsize
