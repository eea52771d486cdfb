"""Crash-safe snapshots of a server's shard: weights, optimizer state, version, data positions.

File layout (``shard{S:03d}-v{VERSION:012d}.ftck``)::

    b"FTMPICK1" | uint64 little-endian JSON length | JSON meta | raw tensor bytes | SHA-256

The SHA-256 covers everything before it. A file is written under a temporary name, fsynced,
renamed into place and the directory fsynced, so a reader sees either the whole snapshot or
none. Loading verifies the magic, lengths and checksum and never executes code (JSON + raw
bytes; no pickle). The writer keeps the newest ``keep`` snapshots of its shard and deletes
older ones only after a newer one is durable. A background writer (``asynchronous=True``)
takes a copy of the bytes and writes them while training continues.
"""

from __future__ import annotations

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

MAGIC = b"FTMPICK1"
_NAME = re.compile(r"^shard(\d{3})-v(\d{12})\.ftck$")


class SnapshotError(ValueError):
    """A snapshot file is missing, truncated, corrupt or from another model."""


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


def encode(meta: dict[str, Any], payload: np.ndarray) -> list[bytes | memoryview]:
    head = json.dumps(meta, sort_keys=True).encode()
    parts: list[bytes | memoryview] = [
        MAGIC,
        struct.pack("<Q", len(head)),
        head,
        memoryview(np.ascontiguousarray(payload).view(np.uint8)),
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
    payload: np.ndarray,
    *,
    keep: int,
) -> Path:
    """Write one snapshot durably, then prune this shard's snapshots to the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = snapshot_path(directory, shard, version)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in encode(meta, payload):
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        failpoint("snapshot_write")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    for old in list_versions(directory, shard)[:-keep]:
        snapshot_path(directory, shard, old).unlink(missing_ok=True)
    return final


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
    if start + n + 32 > len(data):
        raise SnapshotError(f"{path}: truncated (header says {n} bytes of metadata)")
    if hashlib.sha256(data[:-32]).digest() != data[-32:]:
        raise SnapshotError(f"{path}: checksum mismatch (corrupt or truncated)")
    try:
        meta = json.loads(data[start : start + n])
    except ValueError:
        raise SnapshotError(f"{path}: metadata is not valid JSON") from None
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
    a new snapshot waits for the previous one, so memory stays bounded)."""

    def __init__(
        self, directory: str | os.PathLike[str], shard: int, *, keep: int, asynchronous: bool
    ) -> None:
        self.directory = Path(directory)
        self.shard = shard
        self.keep = keep
        self.written: list[int] = []
        self.error: BaseException | None = None
        self._queue: queue.Queue[tuple[int, dict[str, Any], np.ndarray] | None] | None = None
        if asynchronous:
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._run, name="ftmpi-snapshot", daemon=True)
            self._thread.start()

    def submit(self, version: int, meta: dict[str, Any], payload: np.ndarray) -> None:
        """Snapshot ``payload`` (copied now if asynchronous) at ``version``."""
        if self.error is not None:
            raise SnapshotError(f"background snapshot writer failed: {self.error}")
        if self._queue is None:
            write_snapshot(self.directory, self.shard, version, meta, payload, keep=self.keep)
            self.written.append(version)
        else:
            self._queue.put((version, meta, payload.copy()))

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

    def flush(self) -> None:
        """Wait until every submitted snapshot is durable."""
        if self._queue is not None:
            self._queue.join()
        if self.error is not None:
            raise SnapshotError(f"background snapshot writer failed: {self.error}")
