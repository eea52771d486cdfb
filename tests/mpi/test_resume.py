"""A resumed run keeps writing snapshots: it resumes from an older snapshot when the newest is
damaged, and its later snapshots of the same versions replace the ones it resumed from (its
lineage), where another run's snapshots would be refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftmpi.snapshot import list_versions, read_snapshot, snapshot_path, write_snapshot
from tests.mpi.common import PROG

pytestmark = pytest.mark.mpi

ENV = {
    "FTMPI_SERVERS": "2",
    "FTMPI_BACKEND": "mpi",
    "FTMPI_STRATEGY": "checkpoint",
    "FTMPI_CHECKPOINT_EVERY": "10",
    "FTMPI_TIMEOUT": "60",
}


def _train(mpi, run_dir: Path, steps: int, env=None):
    full_env = {**ENV, "FTMPI_RUN_DIR": str(run_dir), **(env or {})}
    res = mpi(4, [PROG, str(steps)], env=full_env, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is True and summary["steps"] == steps, summary
    return summary, res


def test_resume_after_a_damaged_newest_snapshot_finishes_and_keeps_snapshotting(mpi, tmp_path):
    ref, _ = _train(mpi, tmp_path / "ref", 70)
    first, _ = _train(mpi, tmp_path / "first", 40)
    ck = tmp_path / "first" / "checkpoints"
    assert list_versions(ck, 0) == list_versions(ck, 1) == [20, 30, 40]
    newest = snapshot_path(ck, 0, 40)
    damaged = bytearray(newest.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # a flipped byte in the payload
    newest.write_bytes(bytes(damaged))

    again, res = _train(
        mpi, tmp_path / "again", 70, env={"FTMPI_RESUME": "1", "FTMPI_CHECKPOINT_DIR": str(ck)}
    )
    assert "skipping invalid snapshot" in res.stderr and newest.name in res.stderr
    assert "resumed from the snapshot at step 30" in res.stderr
    assert again["run_id"] != first["run_id"]
    # every step after 30 ran again, on the same batches: the weights of an uninterrupted run
    assert again["weights_sha256"] == ref["weights_sha256"]
    # the resumed run wrote 40 (over shard 1's valid 40 of the run it resumed from), 50, 60
    # and 70, and pruned its lineage's older ones to checkpoint_keep=3
    for shard in (0, 1):
        assert list_versions(ck, shard) == [50, 60, 70]
        for v in (50, 60, 70):
            meta = read_snapshot(snapshot_path(ck, shard, v)).meta
            assert meta["run_id"] == again["run_id"]
            assert meta["resumed_from"] == [first["run_id"]]


def test_a_snapshot_naming_a_module_the_job_does_not_use_is_never_imported(mpi, tmp_path):
    """A snapshot is a file: restoring one must not import (execute) the module its metadata
    names. The job refuses it, naming the class, and the module's code never runs."""
    _train(mpi, tmp_path / "first", 20)
    ck = tmp_path / "first" / "checkpoints"
    marker = tmp_path / "imported"
    (tmp_path / "evil_opt.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "import torch\nclass Opt(torch.optim.SGD):\n    pass\n"
    )
    for shard in (0, 1):
        for v in list_versions(ck, shard):
            snap = read_snapshot(snapshot_path(ck, shard, v))
            meta = {**snap.meta, "optimizer": "evil_opt:Opt"}
            write_snapshot(ck, shard, v, meta, snap.payload, keep=3)
    env = {
        **ENV,
        "FTMPI_RUN_DIR": str(tmp_path / "again"),
        "FTMPI_RESUME": "1",
        "FTMPI_CHECKPOINT_DIR": str(ck),
        "PYTHONPATH": str(tmp_path),
    }
    res = mpi(4, [PROG, "40"], env=env, timeout=150)
    assert res.returncode != 0
    assert "evil_opt:Opt is in module evil_opt, which this process has not imported" in res.stderr
    assert not marker.exists(), "restoring a snapshot imported the module it names"
