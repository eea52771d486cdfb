"""A server rank's messages: receiving requests' payloads, replying, and whole-state transfers.

Every call completes within ``config.timeout`` or raises :class:`~ftmpi.wire.CommTimeout`, and
raises :class:`~ftmpi.wire.PeerFailure` when the peer dies (see :mod:`ftmpi.wire`). Replies
carry the replica's current version.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from ftmpi import events, failpoints, wire
from ftmpi.optim_state import Payload, payload_nbytes, table_segments
from ftmpi.replica import ShardReplica, weights_nbytes
from ftmpi.runtime import Runtime
from ftmpi.wire import Header, Kind


@dataclass
class StateSend:
    """A whole-state send in progress (:meth:`ServerWire.start_state_send`)."""

    reqs: list[MPI.Request]
    """Complete them with :func:`ftmpi.wire.wait_all`."""
    payload: Any
    """What the requests send from, kept alive until they complete."""
    version: int
    nbytes: int


class ServerWire:
    """The transport of server slot ``slot`` (holding shard ``shard_index``)."""

    def __init__(self, rt: Runtime, slot: int, shard_index: int, replica: ShardReplica) -> None:
        self.rt = rt
        self.slot = slot
        self.shard_index = shard_index
        self.replica = replica
        self.dropped = 0
        """Messages drained and discarded (:meth:`drain`)."""
        self.receive_buffer: np.ndarray | None = None
        """A mapped buffer for an expected state transfer (chain replacement, ``STATE_SIZE``)."""
        self.buffer_seconds = 0.0
        """Seconds it took to map ``receive_buffer``."""

    # ------------------------------------------------------------ receiving

    def recv(self, src: int, out: Payload, what: str, *, bulk: bool = False) -> None:
        """Receive a request's payload from ``src`` into ``out``."""
        chunk = self.rt.config.chunk_bytes
        wire.recv_payload(
            self.rt.world,
            src,
            out,
            data_tag=wire.TAG_DATA,
            chunk_bytes=wire.bulk_chunk_bytes(chunk) if bulk else chunk,
            timeout=self.rt.config.timeout,
            what=f"server {self.slot} receiving {what} from rank {src}",
        )

    def recv_json(self, header: Header, src: int) -> Any:
        """Receive and decode the JSON document of ``header``'s request."""
        buf = np.empty(header.nbytes, dtype=np.uint8)
        self.recv(src, buf, "a JSON document")
        return wire.decode_json(buf)

    def drain(self, nbytes: int, src: int) -> None:
        """Receive and discard a message's ``nbytes`` of payload (a message that must not be
        applied: another run's or view's, a kind this server does not handle); counted."""
        if nbytes > 0:
            self.recv(src, np.empty(nbytes, dtype=np.uint8), "a dropped message")
        self.dropped += 1

    def map_state_buffer(self, nbytes: int) -> None:
        """Map a receive buffer for a state of ``nbytes`` announced by ``STATE_SIZE``."""
        if self.receive_buffer is None or self.receive_buffer.nbytes != nbytes:
            t0 = time.perf_counter()
            self.receive_buffer = wire.mapped_buffer(nbytes)
            self.buffer_seconds = time.perf_counter() - t0

    def recv_state(
        self, header: Header, src: int, what: str, *, transfer: bool
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Receive a whole shard state (INIT or ``STATE_TRANSFER``): its spec, then weights and
        optimizer state, into the mapped buffer when its size matches. ``transfer``: from a
        chain predecessor (a ``state_received`` event records the timings)."""
        spec: dict[str, Any] = self.recv_json(header, src)
        t0 = time.perf_counter()
        nbytes = int(spec["binary_nbytes"])
        prepared, self.receive_buffer = self.receive_buffer, None
        mapped = prepared is not None and prepared.nbytes == nbytes
        binary = prepared if prepared is not None and mapped else np.empty(nbytes, np.uint8)
        segments = table_segments(spec.get("state_table", []), binary, lead=weights_nbytes(spec))
        t1 = time.perf_counter()
        self.recv(src, segments, what, bulk=True)
        if transfer:
            events.emit(
                self.rt.config.run_dir,
                "state_received",
                role=f"server {self.slot}",
                nbytes=nbytes,
                mapped_first=mapped,
                map_seconds=round(self.buffer_seconds, 6) if mapped else 0.0,
                alloc_seconds=round(t1 - t0, 6),
                seconds=round(time.perf_counter() - t1, 6),
            )
        return spec, binary

    # -------------------------------------------------------------- sending

    def reply(self, dest: int, kind: Kind, payload: np.ndarray | None) -> None:
        """Send ``dest`` a reply of ``kind`` (with the replica's version) and ``payload``."""
        rt = self.rt
        nbytes = 0 if payload is None else payload.nbytes
        header = Header(kind, rt.run, self.replica.version, self.slot, 0, rt.view, nbytes)
        wire.send(
            rt.world,
            dest,
            header,
            payload,
            tag=wire.TAG_REPLY,
            data_tag=wire.TAG_REPLY_DATA,
            chunk_bytes=rt.config.chunk_bytes,
            timeout=rt.config.timeout,
            what=f"server {self.slot} replying to rank {dest}",
        )

    def reply_json(self, dest: int, doc: Any) -> None:
        self.reply(dest, Kind.JSON, wire.encode_json(doc))

    def reply_error(self, dest: int, message: str) -> None:
        """Refuse ``dest``'s request; the worker raises ``RemoteError(message)``."""
        self.reply(dest, Kind.ERROR, wire.encode_json({"error": message}))

    def reply_data(self, dest: int, buf: np.ndarray, what: str) -> None:
        """Send raw reply bytes following a reply (the optimizer state after its table)."""
        wire.wait_all(
            wire.isend_data(
                self.rt.world,
                dest,
                buf,
                data_tag=wire.TAG_REPLY_DATA,
                chunk_bytes=self.rt.config.chunk_bytes,
                what=what,
            ),
            self.rt.config.timeout,
            f"server {self.slot} {what} to rank {dest}",
        )

    def send_state(self, slot: int, *, waited: float) -> None:
        """Send the replica's whole state to server ``slot`` (``STATE_TRANSFER``) and wait.

        The weights and each optimizer-state tensor are sent in place, as segments (no copy;
        nothing is applied until the send completes). The ``state_transfer`` event records the
        bytes, ``pack_seconds`` (describing the state), ``seconds`` (from the first send to the
        completion of the last) and ``waited`` (the seconds the successor took to ask for it)."""
        t0 = time.perf_counter()
        cfg = self.rt.config
        what = f"server {self.slot} sending its state to server {slot}"
        sending = self.start_state_send(slot, Kind.STATE_TRANSFER)
        t1 = time.perf_counter()
        failpoints.failpoint("state_transfer")
        wire.wait_all(sending.reqs, cfg.timeout, what)
        events.emit(
            cfg.run_dir,
            "state_transfer",
            role=f"server {self.slot}",
            to=f"server {slot}",
            version=sending.version,
            nbytes=sending.nbytes,
            pack_seconds=round(t1 - t0, 6),
            seconds=round(time.perf_counter() - t1, 6),
            waited=round(waited, 6),
        )

    def start_state_send(
        self, slot: int, kind: Kind, *, into: np.ndarray | None = None
    ) -> StateSend:
        """Start sending the replica's whole state to server ``slot`` as ``kind`` (laid out as
        a worker's INIT, with the workers' last sequence numbers): in place, so the replica
        must not change until the send completes, or first copied into ``into`` (a buffer of
        :meth:`ShardReplica.state_nbytes` bytes), so it may. ``REPLICATE`` carries the
        replica's counters too (the receiver takes this replica's place)."""
        r, rt, cfg = self.replica, self.rt, self.rt.config
        spec, segments = r.state()
        nbytes = payload_nbytes(segments)
        if into is not None:
            copies = table_segments(spec["state_table"], into, lead=weights_nbytes(spec))
            for dst, src in zip(copies, segments, strict=True):
                np.copyto(dst, src.reshape(-1).view(np.uint8))
            segments = copies
        doc_: dict[str, Any] = {**spec, "binary_nbytes": nbytes}
        doc_["last_seq"] = {str(w): q for w, q in r.last_seq.items()}
        if kind is Kind.REPLICATE:
            doc_["counters"] = {"applied": r.applied, "replayed": r.replayed}
        doc = wire.encode_json(doc_)
        header = Header(kind, rt.run, r.version, self.shard_index, 0, rt.view, doc.nbytes)
        reqs = wire.isend_request(
            rt.world,
            rt.server_world_rank(slot),
            header,
            doc,
            segments,
            chunk_bytes=cfg.chunk_bytes,
            data_chunk_bytes=wire.bulk_chunk_bytes(cfg.chunk_bytes),
            what=f"server {self.slot} sending its state to server {slot}",
        )
        return StateSend(reqs, (doc, segments), r.version, nbytes)
