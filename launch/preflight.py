"""Checks ``ftmpi-run`` makes before it launches anything: a checkpoint directory that snapshots
cannot be written to is refused in one line, with exit status :data:`EXIT_STATUS`.

A job that writes snapshots (strategy ``checkpoint``; see :attr:`ftmpi.Config.snapshot_dir`)
needs its checkpoint directory to be a directory, or creatable; writable (a file is created
and removed there, as the job would); and to have room for
:data:`~ftmpi.snapshot.ROOM_FOR` snapshots of the model: twice the largest snapshot of each
shard already there, or :data:`MIN_FREE_BYTES` when there is none yet (the model's size is
known only once the job runs; each server checks again then, with its shard's real size).

The check runs on the launching host: on several hosts without a shared filesystem it checks
only this host's directory, and the servers' own check at start-up covers theirs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from ftmpi.config import Config
from ftmpi.snapshot import ROOM_FOR, format_bytes, free_bytes, largest_snapshots

MIN_FREE_BYTES = 16 << 20
"""Free space a checkpoint directory without snapshots must have (16 MiB)."""
EXIT_STATUS = 2
"""``ftmpi-run``'s exit status when it refuses the checkpoint directory (bad input)."""
_FLAG = "--checkpoint-dir (FTMPI_CHECKPOINT_DIR)"


def checkpoint_dir_problem(config: Config) -> str | None:
    """Why the job's snapshots could not be written to its checkpoint directory, in one
    sentence naming the path and the fix; None when it is usable or the job writes none.
    Creates nothing that it does not remove."""
    if config.strategy != "checkpoint" or not config.snapshot_dir:
        return None
    directory = Path(config.snapshot_dir)
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == directory else f"cannot be created: {existing} is"
        return (
            f"checkpoint directory {directory} {where} a file, not a directory; remove it or "
            f"choose another directory with {_FLAG}"
        )
    why = _unwritable(existing)
    if why:
        where = "" if existing == directory else f" cannot be created: {existing}"
        return (
            f"checkpoint directory {directory}{where} is not writable ({why}); make it "
            f"writable or choose another directory with {_FLAG}"
        )
    snapshot = largest_snapshots(directory)
    need = ROOM_FOR * snapshot if snapshot else MIN_FREE_BYTES
    free = free_bytes(existing)
    if free < need:
        basis = (
            f"{ROOM_FOR} snapshots of the model there, {format_bytes(snapshot)} each"
            if snapshot
            else "the least a job that writes snapshots starts with"
        )
        return (
            f"checkpoint directory {directory} has {format_bytes(free)} free, less than "
            f"{format_bytes(need)} ({basis}); free space there or choose another directory "
            f"with {_FLAG}"
        )
    return None


def refuse_unusable_checkpoint_dir(config: Config) -> None:
    """Print :func:`checkpoint_dir_problem`'s sentence and exit with :data:`EXIT_STATUS` if
    there is one; return otherwise."""
    why = checkpoint_dir_problem(config)
    if why:
        print(f"ftmpi-run: {why}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS)


def _unwritable(directory: Path) -> str | None:
    """Why a file cannot be created (and removed) in ``directory``, or None."""
    probe = directory / f".ftmpi-preflight-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "it is full: no file can be created there"
        return f"{exc.strerror or exc}, errno {exc.errno}"
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()
    return None
