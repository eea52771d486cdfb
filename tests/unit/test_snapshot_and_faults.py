from __future__ import annotations

import numpy as np
import pytest

from ftmpi.faults import KillSpec, check_schedule, parse_schedule
from ftmpi.snapshot import (
    SnapshotError,
    SnapshotWriter,
    list_versions,
    newest_valid,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)


def test_snapshot_round_trip_and_keep(tmp_path):
    for v in (0, 10, 20, 30):
        write_snapshot(tmp_path, 2, v, {"version": v}, np.arange(v, v + 5, dtype=np.uint8), keep=2)
    assert list_versions(tmp_path, 2) == [20, 30]
    snap = read_snapshot(snapshot_path(tmp_path, 2, 30))
    assert snap.version == 30 and snap.payload.tolist() == [30, 31, 32, 33, 34]
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic"])
def test_damaged_snapshot_is_detected_and_skipped(tmp_path, damage):
    write_snapshot(tmp_path, 0, 1, {"version": 1}, np.ones(100, np.uint8), keep=5)
    write_snapshot(tmp_path, 0, 2, {"version": 2}, np.ones(100, np.uint8), keep=5)
    path = snapshot_path(tmp_path, 0, 2)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[40] ^= 0xFF
    else:
        data[:8] = b"NOTASNAP"
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        read_snapshot(path)
    seen = []
    assert newest_valid(tmp_path, 0, warn=seen.append).version == 1
    assert len(seen) == 1 and path.exists(), "an invalid snapshot must be reported, not deleted"


def test_background_writer_flushes(tmp_path):
    w = SnapshotWriter(tmp_path, 0, keep=3, asynchronous=True)
    buf = np.zeros(1000, np.uint8)
    for v in range(5):
        buf[:] = v
        w.submit(v, {"version": v}, buf)  # the writer copies: later changes do not leak in
    w.flush()
    assert list_versions(tmp_path, 0) == [2, 3, 4]
    assert read_snapshot(snapshot_path(tmp_path, 0, 3)).payload[0] == 3


def test_a_hung_background_write_ends_every_wait_at_the_deadline(tmp_path, monkeypatch):
    import threading
    import time

    import ftmpi.snapshot as snapshot

    release = threading.Event()
    monkeypatch.setattr(snapshot, "write_snapshot", lambda *a, **k: release.wait(30))
    w = SnapshotWriter(tmp_path, 0, keep=3, asynchronous=True, timeout=0.3)
    try:
        w.submit(1, {"version": 1}, np.zeros(4, np.uint8))  # taken by the thread, which hangs
        w.submit(2, {"version": 2}, np.zeros(4, np.uint8))  # waits in the queue
        for wait in (lambda: w.submit(3, {}, np.zeros(4, np.uint8)), w.flush):
            t0 = time.monotonic()
            with pytest.raises(SnapshotError, match=r"not finished within 0.3 s"):
                wait()
            assert time.monotonic() - t0 < 5
    finally:
        release.set()


def test_writer_error_is_reported(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    w = SnapshotWriter(target, 0, keep=1, asynchronous=False)
    with pytest.raises(SnapshotError, match=r"cannot write a snapshot in .*FTMPI_CHECKPOINT_DIR"):
        w.submit(1, {"version": 1}, np.zeros(4, np.uint8))


def test_kill_schedule_parsing():
    assert parse_schedule("server:1@step=50, worker@30s") == [
        KillSpec("server", 1, 50, None),
        KillSpec("worker", 0, None, 30.0),
    ]
    for bad in ("server@", "disk:0@step=5", "server:0@step=0", "server:x@10s", "server@-5s"):
        with pytest.raises(ValueError, match="kill spec"):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="there are 2 server rank"):
        check_schedule(parse_schedule("server:2@step=5"), workers=2, servers=2)
