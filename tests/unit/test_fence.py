"""Fencing by attempt (ftmpi.fence): once the launcher starts attempt N, ranks of an older
attempt write neither snapshots, nor the summary, nor the fatal record."""

from __future__ import annotations

from pathlib import Path

from ftmpi import fatal
from ftmpi.fence import newest_attempt, start_attempt, superseded


def test_an_older_attempt_is_superseded_once_a_newer_one_starts(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    assert superseded(run_dir, 0) is None  # no launcher: never fenced
    start_attempt(run_dir, 0)
    assert newest_attempt(run_dir) == 0 and superseded(run_dir, 0) is None
    start_attempt(run_dir, 1)
    assert superseded(run_dir, 0) == 1
    assert superseded(run_dir, 1) is None
    (tmp_path / "run" / "attempt").write_text("garbage\n")
    assert superseded(run_dir, 0) is None  # unreadable: not fenced (never raises)


def test_a_superseded_rank_does_not_claim_the_fatal_record(tmp_path: Path) -> None:
    run_dir = str(tmp_path)
    start_attempt(run_dir, 1)  # attempt 0's ranks (FTMPI_ATTEMPT unset: 0) are superseded
    record: fatal.FatalRecord = {"rank": 3, "role": "server 0", "type": "CommTimeout"}
    assert fatal.claim(run_dir, record) == (True, None)
    assert not (tmp_path / fatal.FATAL).exists()
    start_attempt(run_dir, 0)
    assert fatal.claim(run_dir, record)[0] and (tmp_path / fatal.FATAL).exists()
