"""Crash-safe snapshots of a server's shard: weights, optimizer state, version, data positions.

File layout (``shard{S:03d}-v{VERSION:012d}.ftck``)::

    b"FTMPICK1" | uint64 little-endian JSON length | JSON meta | raw tensor bytes | SHA-256

The SHA-256 covers everything before it. A file is written under a temporary name, fsynced,
renamed into place and the directory fsynced, so a reader sees either the whole snapshot or
none. Loading verifies the magic, lengths and checksum and never executes code (JSON + raw
bytes; no pickle). The writer keeps the newest ``keep`` snapshots of its shard and deletes
older ones only after a newer one is durable. A background writer (``asynchronous=True``)
takes a copy of the bytes and writes them while training continues.

Identity: ``meta["run_id"]`` is the run that wrote a snapshot and ``meta["resumed_from"]`` the
runs whose snapshots its state descends from (a resumed run's ancestors). A write
may replace or prune only files of its own lineage (:func:`lineage`), so a resumed run's later
snapshots replace the ones it resumed from, while another run's are never touched.

Room: a checkpoint directory must hold :data:`ROOM_FOR` more snapshots than it does
(:func:`require_room`); servers check when they first know their shard's size, and
``ftmpi-run`` checks before it launches anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftmpi.failpoints import failpoint
from ftmpi.optim_state import Payload, concat_segments, segments_of

MAGIC = b"FTMPICK1"
MAX_META_BYTES = 1 << 30
"""A metadata length above this is a damaged or foreign file, not a snapshot."""
_NAME = re.compile(r"^shard(\d{3})-v(\d{12})\.ftck$")
ROOM_FOR = 2
"""Snapshots of the model a checkpoint directory must have free space for: the one being
written while the previous ones still exist, and one to spare."""
_FIX = "choose another directory with FTMPI_CHECKPOINT_DIR (ftmpi-run --checkpoint-dir)"


class SnapshotError(ValueError):
    """A snapshot file is missing, truncated, corrupt or from another model, or the checkpoint
    directory cannot hold one (unwritable, full). The message names the file or directory and
    the fix; it is a problem to fix and start again, not one to recover from in the job."""


@dataclass(frozen=True)
class Snapshot:
    meta: dict[str, Any]
    payload: np.ndarray
    path: Path

    @property
    def version(self) -> int:
        return int(self.meta["version"])


def snapshot_path(directory: str | os.PathLike[str], shard: int, version: int) -> Path:
    return Path(directory) / f"shard{shard:03d}-v{version:012d}.ftck"


def encode(meta: dict[str, Any], payload: Payload) -> list[bytes | memoryview]:
    """The file's parts: magic, metadata length and text, the payload's segments in order, and
    the SHA-256 of all of them."""
    head = json.dumps(meta, sort_keys=True).encode()
    segs = segments_of(payload)
    parts: list[bytes | memoryview] = [
        MAGIC,
        struct.pack("<Q", len(head)),
        head,
        *(np.ascontiguousarray(s).reshape(-1).view(np.uint8).data for s in segs),
    ]
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return [*parts, h.digest()]


def write_snapshot(
    directory: str | os.PathLike[str],
    shard: int,
    version: int,
    meta: dict[str, Any],
    payload: Payload,
    *,
    keep: int,
) -> Path:
    """Write one snapshot durably, then prune this shard's snapshots to the newest ``keep``.

    Raises :class:`SnapshotError` naming the directory and the cause when it cannot be created
    or written (missing permissions, a full disk): nothing is left behind and no existing
    snapshot is touched. A valid snapshot outside this write's :func:`lineage` under the same
    name is never overwritten, and pruning deletes only the lineage's snapshots older than
    ``version`` (never a newer one, never another run's)."""
    directory = Path(directory)
    final = snapshot_path(directory, shard, version)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        make_private_dir(directory)
        _refuse_foreign(final, meta)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise _write_error(directory, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            for part in encode(meta, payload):
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        failpoint("snapshot_write")
        os.replace(tmp, final)
        dirfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _write_error(directory, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    older = [v for v in list_versions(directory, shard) if v < version]
    ours = lineage(meta)
    for old in older[: max(0, len(older) - (keep - 1))]:
        path = snapshot_path(directory, shard, old)
        if read_meta(path).get("run_id") in ours:
            path.unlink(missing_ok=True)
    return final


def lineage(meta: dict[str, Any]) -> set[str | None]:
    """The runs whose snapshots a state described by ``meta`` supersedes: the run that wrote
    it (``run_id``; None when unnamed, matching other unnamed snapshots) and the runs it
    resumed from (``resumed_from``)."""
    return {meta.get("run_id"), *meta.get("resumed_from", [])}


def encoded_nbytes(meta: dict[str, Any], payload: Payload) -> int:
    """Bytes of the snapshot file :func:`encode` makes of ``meta`` and ``payload``."""
    head = len(json.dumps(meta, sort_keys=True).encode())
    return len(MAGIC) + 8 + head + sum(int(s.nbytes) for s in segments_of(payload)) + 32


def free_bytes(directory: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``directory`` (or of
    its nearest existing parent, when it does not exist yet)."""
    d = Path(directory).absolute()
    while not d.exists() and d != d.parent:
        d = d.parent
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def largest_snapshots(directory: str | os.PathLike[str]) -> int:
    """Bytes of one snapshot of the whole model as ``directory`` holds them: the largest file
    of each shard, summed (0 when it holds none)."""
    largest: dict[int, int] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for e in entries:
        m = _NAME.match(e.name)
        if m:
            with contextlib.suppress(OSError):
                largest[int(m[1])] = max(largest.get(int(m[1]), 0), e.stat().st_size)
    return sum(largest.values())


def require_room(directory: str | os.PathLike[str], snapshot_nbytes: int) -> None:
    """Raise :class:`SnapshotError` naming ``directory``, its free space and the fix unless it
    has room for :data:`ROOM_FOR` more snapshots of ``snapshot_nbytes`` bytes each."""
    need = ROOM_FOR * snapshot_nbytes
    free = free_bytes(directory)
    if free < need:
        raise SnapshotError(
            f"checkpoint directory {directory} has {format_bytes(free)} free, less than the "
            f"{format_bytes(need)} that {ROOM_FOR} snapshots of {format_bytes(snapshot_nbytes)} "
            f"need; free space there or {_FIX}"
        )


def format_bytes(n: int) -> str:
    """``n`` bytes for a message: ``512 B``, ``64.0 KiB``, ``3.2 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` (mode 0700) and any missing parent (0750, as a run directory), so
    that neither exposes snapshots to other users; existing directories are left as they are."""
    missing = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another server created it meanwhile
            d.mkdir(mode=0o700 if d == directory else 0o750)
    if not directory.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(directory))


def _write_error(directory: Path, exc: OSError) -> SnapshotError:
    return SnapshotError(
        f"cannot write a snapshot in {directory}: {exc.strerror or exc} "
        f"(errno {exc.errno}); make the directory writable, free space, or {_FIX}"
    )


def _refuse_foreign(final: Path, meta: dict[str, Any]) -> None:
    """Refuse to replace a valid snapshot written by a run outside ``meta``'s lineage."""
    if not final.exists():
        return
    try:
        other = read_snapshot(final).meta.get("run_id")
    except SnapshotError:
        return  # an invalid file may be replaced
    if other not in lineage(meta):
        raise SnapshotError(
            f"{final} is a valid snapshot of run {other!r}, not of this run "
            f"{meta.get('run_id')!r} nor of a run it resumed from; refusing to overwrite it: "
            "give this run its own FTMPI_CHECKPOINT_DIR, or resume from it (FTMPI_RESUME=1)"
        )


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata at the start of a snapshot file, unverified (``{}`` if unreadable): cheap,
    for deciding which files are this run's; :func:`read_snapshot` verifies."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or not head.startswith(MAGIC):
                return {}
            (n,) = struct.unpack_from("<Q", head, len(MAGIC))
            if n > MAX_META_BYTES:
                return {}
            doc = json.loads(f.read(n))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def incompatibility(meta: dict[str, Any], shard: dict[str, Any]) -> str | None:
    """Why a snapshot's shard layout (``meta["shard"]``) differs from ``shard`` (the running
    model's, as :meth:`ftmpi.sharding.Shard.to_json`: slots ``[name, group, shape, offset]``),
    naming the parameters; None if the names and shapes match."""
    mine = {s[0]: list(s[2]) for s in shard.get("slots", [])}
    theirs = {s[0]: list(s[2]) for s in meta.get("shard", {}).get("slots", [])}
    problems = [
        f"{n}: model {mine[n]}, snapshot {theirs[n]}"
        for n in mine
        if n in theirs and mine[n] != theirs[n]
    ]
    problems += [f"{n}: in the model, not in the snapshot" for n in mine if n not in theirs]
    problems += [f"{n}: in the snapshot, not in the model" for n in theirs if n not in mine]
    if not problems:
        return None
    return "the snapshot holds another model: " + "; ".join(problems)


def list_versions(directory: str | os.PathLike[str], shard: int) -> list[int]:
    """Versions of ``shard`` present in ``directory`` (by file name, oldest first)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = _NAME.match(n)
        if m and int(m[1]) == shard:
            out.append(int(m[2]))
    return sorted(out)


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read and verify one snapshot; raises :class:`SnapshotError` saying what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) < len(MAGIC) + 8 + 32 or not data.startswith(MAGIC):
        raise SnapshotError(f"{path}: not an ftmpi snapshot (bad magic or truncated)")
    (n,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    if n > MAX_META_BYTES or start + n + 32 > len(data):
        raise SnapshotError(f"{path}: truncated (header says {n} bytes of metadata)")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise SnapshotError(f"{path}: checksum mismatch (corrupt or truncated)")
    try:
        meta = json.loads(data[start : start + n])
    except ValueError:
        raise SnapshotError(f"{path}: metadata is not valid JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("version"), int):
        raise SnapshotError(f"{path}: metadata is not an ftmpi snapshot's (no version)")
    payload = np.frombuffer(
        data, dtype=np.uint8, offset=start + n, count=len(data) - start - n - 32
    )
    return Snapshot(meta, payload, path)


def newest_valid(
    directory: str | os.PathLike[str], shard: int, *, at_most: int | None = None, warn: Any = None
) -> Snapshot | None:
    """The newest snapshot of ``shard`` that verifies (optionally with version <= ``at_most``);
    invalid ones are reported through ``warn(message)`` and skipped, never deleted."""
    for v in reversed(list_versions(directory, shard)):
        if at_most is not None and v > at_most:
            continue
        try:
            return read_snapshot(snapshot_path(directory, shard, v))
        except SnapshotError as exc:
            if warn is not None:
                warn(f"skipping invalid snapshot: {exc}")
    return None


class SnapshotWriter:
    """Writes snapshots synchronously, or on a background thread (one pending write at most:
    a new snapshot waits for the previous one, so memory stays bounded). Every wait for the
    background thread ends within ``timeout`` seconds."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        shard: int,
        *,
        keep: int,
        asynchronous: bool,
        timeout: float = 300.0,
    ) -> None:
        self.directory = Path(directory)
        self.shard = shard
        self.keep = keep
        self.timeout = timeout
        """Seconds a wait for the background write may take (a hung filesystem ends in
        :class:`SnapshotError` instead of a hung server)."""
        self.written: list[int] = []
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, dict[str, Any], np.ndarray] | None] | None = None
        if asynchronous:
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._run, name="ftmpi-snapshot", daemon=True)
            self._thread.start()

    def submit(self, version: int, meta: dict[str, Any], payload: Payload) -> None:
        """Snapshot ``payload`` (one array or segments) at ``version``. Synchronous: written
        from the caller's memory before returning. Asynchronous: copied now (once), so the
        caller may change its tensors as soon as this returns."""
        self.raise_if_failed()
        if self._queue is None:
            write_snapshot(self.directory, self.shard, version, meta, payload, keep=self.keep)
            self.written.append(version)
        else:
            try:
                self._queue.put((version, meta, concat_segments(payload)), timeout=self.timeout)
            except queue.Full:
                raise self._overdue(f"snapshot {version} could not be queued") from None

    def _run(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            try:
                write_snapshot(
                    self.directory, self.shard, item[0], item[1], item[2], keep=self.keep
                )
                self.written.append(item[0])
            except BaseException as exc:  # reported at the next submit/flush
                self.error = exc
            finally:
                self._queue.task_done()

    @property
    def busy(self) -> bool:
        """Whether a background write is still in progress (never for a synchronous writer)."""
        return self._queue is not None and bool(self._queue.unfinished_tasks)

    def raise_if_failed(self) -> None:
        """Raise :class:`SnapshotError` if a background write has failed (its message says
        why and the fix); the caller should end the job rather than train on without
        snapshots."""
        if self.error is not None:
            raise SnapshotError(f"background snapshot writer failed: {self.error}")

    def flush(self) -> None:
        """Wait until every submitted snapshot is durable; raises as :meth:`raise_if_failed`."""
        pending = self._queue
        if pending is not None:
            done = pending.all_tasks_done
            with done:
                if not done.wait_for(lambda: not pending.unfinished_tasks, self.timeout):
                    raise self._overdue("the pending snapshot is not durable")
        self.raise_if_failed()

    def _overdue(self, what: str) -> SnapshotError:
        return SnapshotError(
            f"{what}: the background write in {self.directory} has not finished within "
            f"{self.timeout:g} s (a hung or very slow filesystem?); check the filesystem, or "
            "choose another directory with FTMPI_CHECKPOINT_DIR"
        )
