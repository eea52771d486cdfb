"""Storage faults under the snapshot writer and reader: a missing, unwritable or full checkpoint
directory, files from another run or another model, crafted files. Each gives a clear error or
falls back to the previous valid snapshot; nothing valid is deleted or overwritten.

A full disk is a real 64 KiB tmpfs when this process may mount one (root), else a file-size
limit (``RLIMIT_FSIZE``, the write fails with EFBIG); an unwritable directory is a read-only
tmpfs as root (root ignores permission bits), else a directory with mode 0500.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import resource
import signal
import stat
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ftmpi import events
from ftmpi.snapshot import (
    MAGIC,
    SnapshotError,
    encode,
    incompatibility,
    list_versions,
    newest_valid,
    read_snapshot,
    require_room,
    snapshot_path,
    write_snapshot,
)

TINY = 64 * 1024


def _meta(v, run="run-a"):
    return {"version": v, "run_id": run}


def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextlib.contextmanager
def full_disk(path: Path):
    """A directory on a 64 KiB filesystem; the body's big writes fail for lack of space."""
    if _mount(path, f"size={TINY},mode=0700"):
        try:
            yield lambda: contextlib.nullcontext()
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    path.mkdir()

    @contextlib.contextmanager
    def limit():
        old, handler = (
            resource.getrlimit(resource.RLIMIT_FSIZE),
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
        )
        resource.setrlimit(resource.RLIMIT_FSIZE, (TINY, old[1]))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, handler)

    yield limit


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` (holding snapshots) unwritable for the body."""
    if _mount(path.parent / "ro", "size=1m"):
        ro = path.parent / "ro"
        try:
            for f in path.iterdir():
                (ro / f.name).write_bytes(f.read_bytes())
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
            yield ro
        finally:
            subprocess.run(["umount", str(ro)], check=True)
        return
    path.chmod(0o500)
    try:
        yield path
    finally:
        path.chmod(0o700)


def test_missing_directory_is_created_private_and_reads_as_empty(tmp_path):
    missing = tmp_path / "not" / "yet"
    assert list_versions(missing, 0) == [] and newest_valid(missing, 0) is None
    old = os.umask(0)  # modes must not depend on the caller's umask
    try:
        path = write_snapshot(missing, 0, 5, _meta(5), np.zeros(8, np.uint8), keep=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE(missing.stat().st_mode) == 0o700
    assert stat.S_IMODE(missing.parent.stat().st_mode) == 0o750  # e.g. <run_dir>/checkpoints
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_unwritable_directory_is_a_clear_error_and_keeps_the_snapshots(tmp_path):
    d = tmp_path / "ck"
    write_snapshot(d, 0, 10, _meta(10), np.arange(16, dtype=np.uint8), keep=3)
    with read_only(d) as ro:
        with pytest.raises(SnapshotError, match=r"cannot write a snapshot in .*FTMPI_CHECKPOINT"):
            write_snapshot(ro, 0, 20, _meta(20), np.zeros(16, np.uint8), keep=1)
        assert newest_valid(ro, 0).version == 10


def test_full_disk_is_a_clear_error_and_the_previous_snapshot_stays_valid(tmp_path):
    d = tmp_path / "full"
    with full_disk(d) as limit:
        write_snapshot(d, 0, 10, _meta(10), np.arange(1000, dtype=np.uint8), keep=1)
        with limit(), pytest.raises(SnapshotError, match=r"cannot write a snapshot in .*errno"):
            write_snapshot(d, 0, 20, _meta(20), np.ones(4 * TINY, np.uint8), keep=1)
        assert list_versions(d, 0) == [10], "the failed write must not prune the valid one"
        kept = read_snapshot(snapshot_path(d, 0, 10)).payload
        assert np.array_equal(kept, np.arange(1000, dtype=np.uint8))
        assert sorted(p.name for p in d.iterdir()) == [snapshot_path(d, 0, 10).name], (
            "a temporary file was left behind"
        )


def test_another_runs_snapshots_are_never_overwritten_or_pruned(tmp_path):
    write_snapshot(tmp_path, 0, 10, _meta(10, "other"), np.ones(4, np.uint8), keep=3)
    write_snapshot(tmp_path, 0, 20, _meta(20, "other"), np.ones(4, np.uint8), keep=3)
    for v in (30, 40, 50):
        write_snapshot(tmp_path, 0, v, _meta(v), np.zeros(4, np.uint8), keep=1)
    assert list_versions(tmp_path, 0) == [10, 20, 50]  # ours pruned to keep=1; theirs kept
    with pytest.raises(SnapshotError, match=r"valid snapshot of run 'other'.*refusing"):
        write_snapshot(tmp_path, 0, 20, _meta(20), np.zeros(4, np.uint8), keep=1)
    assert read_snapshot(snapshot_path(tmp_path, 0, 20)).meta["run_id"] == "other"


def test_a_resumed_run_replaces_and_prunes_its_lineage_but_no_other_run(tmp_path):
    for v in (20, 30, 40):
        write_snapshot(tmp_path, 0, v, _meta(v, "first"), np.ones(4, np.uint8), keep=3)
    resumed = {**_meta(40, "again"), "resumed_from": ["first"]}
    write_snapshot(tmp_path, 0, 40, resumed, np.zeros(4, np.uint8), keep=3)  # over first's 40
    assert read_snapshot(snapshot_path(tmp_path, 0, 40)).meta["run_id"] == "again"
    for v in (50, 60):
        write_snapshot(tmp_path, 0, v, {**resumed, "version": v}, np.zeros(4, np.uint8), keep=3)
    assert list_versions(tmp_path, 0) == [40, 50, 60]  # first's 20 and 30 pruned as its own
    # a run outside the lineage still may not replace them
    with pytest.raises(SnapshotError, match=r"run 'again', not of this run 'other'.*refusing"):
        write_snapshot(tmp_path, 0, 50, _meta(50, "other"), np.ones(4, np.uint8), keep=3)
    assert read_snapshot(snapshot_path(tmp_path, 0, 50)).meta["run_id"] == "again"


def test_too_little_room_for_two_snapshots_is_a_clear_error(tmp_path):
    d = tmp_path / "full"
    with full_disk(d):
        with pytest.raises(SnapshotError, match=r"has .* free, less than the .* that 2 snapshots"):
            require_room(d, TINY)
        require_room(d, TINY // 4)
    require_room(tmp_path / "not" / "yet", 1024)  # measured on the nearest existing parent


def test_pruning_never_deletes_a_newer_snapshot(tmp_path):
    """After a rollback to 10 the server writes 20 again; the pre-failure 30 is kept."""
    for v in (10, 20, 30):
        write_snapshot(tmp_path, 0, v, _meta(v), np.zeros(4, np.uint8), keep=3)
    write_snapshot(tmp_path, 0, 20, _meta(20), np.zeros(4, np.uint8), keep=1)
    assert list_versions(tmp_path, 0) == [20, 30]


def _slots(*shapes):
    return {"slots": [[n, 0, list(s), 0] for n, s in shapes]}


def test_a_snapshot_of_another_model_is_named_parameter_by_parameter():
    model = _slots(("0.weight", (64, 20)), ("0.bias", (64,)), ("3.weight", (4, 64)))
    snap = {"shard": _slots(("0.weight", (32, 20)), ("0.bias", (64,)), ("2.weight", (4, 32)))}
    why = incompatibility(snap, model)
    assert why is not None
    assert "0.weight: model [64, 20], snapshot [32, 20]" in why
    assert "3.weight: in the model, not in the snapshot" in why
    assert "2.weight: in the snapshot, not in the model" in why and "0.bias" not in why
    assert incompatibility({"shard": model}, model) is None


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


@pytest.mark.parametrize("where", ["whole-file", "payload", "metadata"])
def test_a_pickle_payload_is_never_executed(tmp_path, where):
    _Payload.marker = tmp_path / "pwned"
    evil = pickle.dumps(_Payload())
    path = snapshot_path(tmp_path, 0, 1)
    if where == "whole-file":
        path.write_bytes(evil)
    elif where == "payload":  # a well-formed snapshot whose bytes are a pickle: raw bytes only
        path.write_bytes(b"".join(encode(_meta(1), np.frombuffer(evil, np.uint8))))
    else:  # the metadata slot holds the pickle, checksum valid
        body = MAGIC + struct.pack("<Q", len(evil)) + evil
        path.write_bytes(body + hashlib.sha256(body).digest())
    if where == "payload":
        assert read_snapshot(path).payload.tobytes() == evil
    else:
        with pytest.raises(SnapshotError):
            read_snapshot(path)
        assert newest_valid(tmp_path, 0, warn=print) is None
    assert not _Payload.marker.exists(), "loading a snapshot executed code"


def test_event_log_and_run_directory_are_not_readable_by_others(tmp_path):
    run_dir = tmp_path / "run"
    old = os.umask(0)
    try:
        events.emit(str(run_dir), "probe")
    finally:
        os.umask(old)
    assert stat.S_IMODE(run_dir.stat().st_mode) & 0o007 == 0
    assert stat.S_IMODE((run_dir / "events.jsonl").stat().st_mode) & 0o007 == 0
