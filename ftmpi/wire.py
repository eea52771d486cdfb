"""Point-to-point messages between workers and servers: header + raw chunked payload.

Every message is a fixed 8 x int64 header followed by an optional payload sent as raw bytes (no
pickle) in chunks of at most ``chunk_bytes``. MPI's non-overtaking rule (same source, tag and
communicator) keeps a message's header and chunks in order, so a receiver that matched a header
from rank ``r`` then receives exactly that message's chunks from ``r``.

Every wait here has a deadline: :func:`wait_all` polls the requests and raises
:class:`CommTimeout` when the deadline passes, and turns an MPI error (``ERR_PROC_FAILED``,
``ERR_REVOKED`` under ULFM) into :class:`PeerFailure`, cancelling what it can; memory a
cancelled request may still use stays referenced until MPI completes it (:func:`_cancel`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
from mpi4py import MPI

from ftmpi.optim_state import Payload, segments_of

ANY_SOURCE = MPI.ANY_SOURCE

TAG_HEADER = 7001
TAG_DATA = 7002
TAG_REPLY = 7003
TAG_REPLY_DATA = 7004
TAG_PROGRESS = 7005
"""Never sent: probed for to let MPI progress what is in flight (``Mirror.progress``)."""

HEADER_LEN = 8


@dataclass(frozen=True)
class Polling:
    """How a wait polls: ``spin`` tests back to back, then sleeps between tests, from 20 µs
    doubling up to ``sleep_max`` seconds. MPI's shared-memory transport has no blocking
    receive, so a rank waiting for a message either holds a core (spinning) or sees the
    message only when its sleep ends; on a node with more ranks than cores both cost."""

    spin: int
    sleep_max: float


URGENT = Polling(spin=2000, sleep_max=200e-6)
"""For waits a worker's step waits on: answer within microseconds while the wait is short."""
PATIENT = Polling(spin=20, sleep_max=1e-3)
"""For waits nothing urgent depends on (a chain member behind the head waiting for its next
forward, a head waiting for its forward to be taken): give the core to the ranks that have
work. Up to a millisecond late, which the chain absorbs while workers compute."""
_SLEEP_MIN = 20e-6


class Kind(IntEnum):
    """Message kinds, one per meaning. Requests and chain messages travel on TAG_HEADER;
    replies on TAG_REPLY."""

    INIT = 1  # worker -> server: JSON shard spec + optimizer, then initial weights / state
    PUSH = 2  # worker -> server: gradient of one shard; reply carries the new weights
    PULL = 3  # worker -> server: reply carries the current weights
    HPARAMS = 4  # worker -> server: JSON param-group hyper-parameters (LR schedules)
    STATS = 5  # worker -> server: reply carries JSON counters
    STOP = 6  # worker -> server: this worker is done
    OK = 7  # server -> worker: reply without payload
    WEIGHTS = 8  # server -> worker: reply carrying weights
    JSON = 9  # server -> worker: reply carrying a JSON document
    ERROR = 10  # server -> worker: JSON {"error": ...}
    STATE = 11  # worker -> server: reply is JSON (state table) followed by the raw state bytes
    SNAPSHOTS = 12  # worker -> server: reply JSON {"versions": [...]} of valid snapshots
    RESTORE = 13  # worker -> server: load snapshot header.version; reply JSON positions
    FORWARD = 14  # server -> its chain successor: JSON update list, then the gradients
    COMMITTED = 15  # server -> its chain predecessor: the tail has every update to header.version
    CHAIN_STOP = 16  # server -> its chain successor: every update has been forwarded; exit
    REPLAY = 17  # worker -> server: JSON gradient log summary, then their sum; reply OK
    SNAPSHOT = 18  # worker -> server: write a snapshot now; reply JSON {"version"} once durable
    STATE_SIZE = 19  # server -> its successor that asked for the state: header.state_nbytes
    RECEIVED = 20  # server -> its chain predecessor: received every update to header.version
    STATE_ASK = 21  # replacement -> its predecessor: I have no state; how large is it?
    STATE_READY = 22  # replacement -> its predecessor: my receive buffer is mapped; send it
    STATE_MISSING = 23  # server -> its predecessor: forwarded updates, but I have no state
    STATE_TRANSFER = 24  # server -> its chain successor: the whole shard state (INIT's layout)
    REPLICATE = 25  # server -> its chain successor: the whole state every replicate_every updates


STATE_REQUESTS = frozenset({Kind.STATE_ASK, Kind.STATE_READY, Kind.STATE_MISSING})
"""The kinds a chain member without shard state asks its predecessor for it with."""


class UnknownKind(ValueError):
    """A header's kind is not a :class:`Kind`: the message comes from something that does not
    speak this protocol (or another version of it). The message names the value."""

    def __init__(self, value: int, nbytes: int, source: int | None = None) -> None:
        sender = "" if source is None else f" from rank {source}"
        super().__init__(f"unknown message kind {value}{sender} ({nbytes} payload bytes follow)")
        self.value = value
        self.nbytes = nbytes
        """Bytes of the payload that follows the header (to drain)."""
        self.source = source


class CommTimeout(TimeoutError):
    """A blocking wait passed its deadline. The message says what was awaited and for how long."""


class PeerFailure(RuntimeError):
    """An MPI call failed because a peer died or the communicator was revoked (ULFM)."""

    def __init__(self, what: str, error_class: int) -> None:
        super().__init__(f"{what}: MPI error class {error_class} ({_error_name(error_class)})")
        self.error_class = error_class


class ServerDown(RuntimeError):
    """A server slot has no live rank (it died and its replacement is not ready yet)."""

    def __init__(self, server: int) -> None:
        super().__init__(f"server {server} is down")
        self.server = server


class RemoteError(RuntimeError):
    """A server refused a request; the message is the server's explanation."""


def _error_name(error_class: int) -> str:
    names = {
        getattr(MPI, n, None): n
        for n in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
    }
    return names.get(error_class, "other")


def run_hash(run_id: str) -> int:
    """A 62-bit digest of ``run_id``, carried in every header."""
    return int.from_bytes(hashlib.blake2b(run_id.encode(), digest_size=8).digest(), "big") >> 2


@contextlib.contextmanager
def mpi_errors(what: str) -> Iterator[None]:
    """Turn an ``MPI.Exception`` raised inside the block into :class:`PeerFailure`."""
    try:
        yield
    except MPI.Exception as exc:
        raise PeerFailure(what, exc.Get_error_class()) from exc


@dataclass(frozen=True)
class Header:
    """The fixed header of every message: eight int64 on the wire.

    ``version`` is the shard's version the message is about: the server's update count
    (weights, chain acknowledgements, state), the base version a gradient was computed on
    (push), the snapshot to load (restore). ``state_nbytes`` is the size of the shard state a
    ``STATE_SIZE`` announces, 0 in every other kind.
    """

    kind: Kind
    run: int
    version: int
    shard: int
    seq: int
    view: int
    nbytes: int
    state_nbytes: int = 0

    def array(self) -> np.ndarray:
        return np.array(
            [
                int(self.kind),
                self.run,
                self.version,
                self.shard,
                self.seq,
                self.view,
                self.nbytes,
                self.state_nbytes,
            ],
            dtype=np.int64,
        )

    @classmethod
    def from_array(cls, a: np.ndarray) -> Header:
        """Decode a received header; raises :class:`UnknownKind` (naming the value) when its
        kind is not a :class:`Kind`."""
        values = [int(x) for x in a]
        try:
            kind = Kind(values[0])
        except ValueError:
            raise UnknownKind(values[0], values[6]) from None
        return cls(kind, *values[1:])


def wait_all(
    reqs: Sequence[MPI.Request], timeout: float, what: str, polling: Polling = URGENT
) -> list[MPI.Status]:
    """Wait for every request, polling (see :class:`Polling`), until ``timeout`` seconds have
    passed.

    Raises :class:`CommTimeout` (requests are cancelled) or :class:`PeerFailure` on an MPI error.
    Returns the statuses in request order.
    """
    reqs = list(reqs)
    statuses = [MPI.Status() for _ in reqs]
    if not reqs:
        return statuses
    deadline = time.monotonic() + timeout
    tests = 0
    sleep = _SLEEP_MIN
    try:
        while not MPI.Request.Testall(reqs, statuses):
            tests += 1
            if tests < polling.spin:
                continue
            if time.monotonic() > deadline:
                _cancel(reqs)
                raise CommTimeout(f"{what}: no completion within {timeout:g} s")
            time.sleep(sleep)
            sleep = min(sleep * 2, polling.sleep_max)
    except MPI.Exception as exc:
        _cancel(reqs)
        cls = exc.Get_error_class()
        if cls == MPI.ERR_IN_STATUS:  # the per-request error is in the statuses
            errors = [MPI.Get_error_class(st.Get_error()) for st in statuses]
            cls = next((e for e in errors if e != MPI.SUCCESS), cls)
        raise PeerFailure(what, cls) from exc
    return statuses


CANCEL_GRACE = 0.05
"""Seconds :func:`_cancel` tests cancelled requests for completion before it leaves them to
later tests: a cancelled receive completes at once; a send a receiver has not matched cannot be
taken back (Open MPI does not cancel sends) and completes only when matched or failed."""

_unfinished: list[MPI.Request] = []
"""Cancelled requests MPI has not completed yet. Each holds (mpi4py keeps it) the buffer MPI
may still read or write, so that memory is not freed before MPI is done with it."""


def _completed(req: MPI.Request) -> bool:
    """Test ``req`` once: whether MPI has completed it (an error completes it too, once MPI
    has released the request)."""
    try:
        return bool(req.Test())
    except MPI.Exception:
        return req == MPI.REQUEST_NULL


def _cancel(reqs: Sequence[MPI.Request]) -> None:
    """Cancel what a failed wait leaves behind, never releasing memory MPI still uses: each
    request is cancelled, then tested for completion for up to :data:`CANCEL_GRACE` seconds;
    the requests still incomplete (with their buffers) are kept in ``_unfinished`` and tested
    again at every later cancel (and :func:`unfinished_requests`) until MPI completes them."""
    live = [r for r in reqs if r != MPI.REQUEST_NULL]
    for r in live:
        with contextlib.suppress(MPI.Exception):
            r.Cancel()
    _unfinished[:] = [r for r in _unfinished if not _completed(r)]
    deadline = time.monotonic() + CANCEL_GRACE
    while True:
        live = [r for r in live if not _completed(r)]
        if not live or time.monotonic() >= deadline:
            break
        time.sleep(_SLEEP_MIN)
    _unfinished.extend(live)


def abandon_requests(reqs: Sequence[MPI.Request]) -> None:
    """Stop waiting for ``reqs`` after a failure, never releasing memory MPI still uses (see
    :func:`_cancel`)."""
    _cancel(reqs)


def unfinished_requests() -> int:
    """How many cancelled requests MPI has still not completed (their buffers are kept);
    tests each once, releasing those that have completed since."""
    _unfinished[:] = [r for r in _unfinished if not _completed(r)]
    return len(_unfinished)


BULK_CHUNK_BYTES = 16 << 20
"""Smallest chunk of a shard's state (INIT payloads: initialisation, chain state transfer):
fewer rendezvous hand-shakes. 190.7 MiB took 0.156 s in 1 MiB chunks and 0.115 s in 16 MiB
chunks (``ftmpi-run bench recovery --quick --params 25000000``); 256 MiB was no faster. Into a
buffer mapped first, over the TCP path a spawned replacement has: 0.082-0.089 s in 16 MiB
chunks, 0.097-0.098 s in 1 MiB chunks."""


def bulk_chunk_bytes(chunk_bytes: int) -> int:
    """The chunk size of INIT payloads, on both sides, for a configured ``chunk_bytes``."""
    return max(chunk_bytes, BULK_CHUNK_BYTES)


PAGE_BYTES = 4096


def mapped_buffer(nbytes: int) -> np.ndarray:
    """A new byte buffer whose pages are already mapped (one byte of each written).

    Receiving into memory never touched faults every page inside MPI's copy: 190 MiB arrived at
    0.73 GiB/s fresh against 2.0 GiB/s mapped first, the mapping included (two ranks, one of
    them spawned, ``benchmarks/limits.py``). A receiver that knows a large message is coming
    maps its buffer before it asks for it."""
    buf = np.empty(nbytes, dtype=np.uint8)
    buf[::PAGE_BYTES] = 0
    return buf


def chunks(payload: Payload, chunk_bytes: int) -> list[np.ndarray]:
    """``payload`` as byte views of at most ``chunk_bytes``, segment by segment."""
    out: list[np.ndarray] = []
    for seg in segments_of(payload):
        flat = seg.reshape(-1).view(np.uint8)
        out += [flat[i : i + chunk_bytes] for i in range(0, flat.size, chunk_bytes)]
    return out


def isend(
    comm: MPI.Comm,
    dest: int,
    header: Header,
    payload: np.ndarray | None,
    *,
    tag: int,
    data_tag: int,
    chunk_bytes: int,
    what: str,
) -> list[MPI.Request]:
    """Start sending ``header`` then ``payload`` (any contiguous array, as bytes) to ``dest``.

    The caller keeps ``payload`` alive and unchanged until the returned requests complete.
    """
    with mpi_errors(what):
        reqs = [comm.Isend(header.array(), dest=dest, tag=tag)]
    if payload is not None:
        reqs += isend_data(
            comm, dest, payload, data_tag=data_tag, chunk_bytes=chunk_bytes, what=what
        )
    return reqs


def isend_data(
    comm: MPI.Comm, dest: int, payload: Payload, *, data_tag: int, chunk_bytes: int, what: str
) -> list[MPI.Request]:
    """Start sending ``payload`` as raw chunks (no header), each segment in place (no copy)."""
    with mpi_errors(what):
        return [comm.Isend(c, dest=dest, tag=data_tag) for c in chunks(payload, chunk_bytes)]


def isend_request(
    comm: MPI.Comm,
    dest: int,
    header: Header,
    doc: np.ndarray,
    data: Payload,
    *,
    chunk_bytes: int,
    what: str,
    data_chunk_bytes: int | None = None,
) -> list[MPI.Request]:
    """Start sending a request carrying a JSON document and raw bytes: ``header`` and ``doc``
    (``header.nbytes`` = its size) on the request tag, then ``data`` as chunks on the data tag
    (of ``data_chunk_bytes``, default ``chunk_bytes``). The caller keeps ``doc`` and ``data``
    alive and unchanged until the requests complete."""
    reqs = isend(
        comm,
        dest,
        header,
        doc,
        tag=TAG_HEADER,
        data_tag=TAG_DATA,
        chunk_bytes=chunk_bytes,
        what=what,
    )
    data_chunks = chunk_bytes if data_chunk_bytes is None else data_chunk_bytes
    return reqs + isend_data(
        comm, dest, data, data_tag=TAG_DATA, chunk_bytes=data_chunks, what=what
    )


def send(
    comm: MPI.Comm,
    dest: int,
    header: Header,
    payload: np.ndarray | None,
    *,
    tag: int,
    data_tag: int,
    chunk_bytes: int,
    timeout: float,
    what: str,
) -> None:
    """Send ``header`` and ``payload`` to ``dest`` and wait until the send completes."""
    reqs = isend(
        comm, dest, header, payload, tag=tag, data_tag=data_tag, chunk_bytes=chunk_bytes, what=what
    )
    wait_all(reqs, timeout, what)


def post_header(comm: MPI.Comm, source: int, tag: int) -> tuple[MPI.Request, np.ndarray]:
    """Post a receive for one header; complete it with :func:`wait_all`."""
    buf = np.empty(HEADER_LEN, dtype=np.int64)
    with mpi_errors("posting a header receive"):
        return comm.Irecv(buf, source=source, tag=tag), buf


def recv_header(
    comm: MPI.Comm,
    source: int,
    *,
    tag: int,
    timeout: float,
    what: str,
    polling: Polling = URGENT,
) -> tuple[Header, int]:
    """Receive one header from ``source`` (may be ``MPI.ANY_SOURCE``); return it and its sender.
    Raises :class:`UnknownKind` (with the sender) for a header of no known kind; its payload,
    if any, is still to be received."""
    req, buf = post_header(comm, source, tag)
    (status,) = wait_all([req], timeout, what, polling)
    try:
        return Header.from_array(buf), status.Get_source()
    except UnknownKind as exc:
        raise UnknownKind(exc.value, exc.nbytes, status.Get_source()) from None


def recv_payload(
    comm: MPI.Comm,
    source: int,
    out: Payload,
    *,
    data_tag: int,
    chunk_bytes: int,
    timeout: float,
    what: str,
) -> None:
    """Receive a payload from ``source`` into ``out`` (split into the sender's segments)."""
    with mpi_errors(what):
        reqs = [comm.Irecv(c, source=source, tag=data_tag) for c in chunks(out, chunk_bytes)]
    wait_all(reqs, timeout, what)


def encode_json(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8)


def decode_json(buf: np.ndarray) -> Any:
    return json.loads(buf.tobytes().decode())
