"""Per-evaluation metrics in the run directory, as CSV (for spreadsheets) and JSON lines (full).

Each record is written and flushed immediately, so a run that dies keeps every record made
before its death. Records never overwrite an existing file's rows: a resumed run appends.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

CSV_FIELDS = (
    "wall_time",
    "step",
    "epoch",
    "loss",
    "test_accuracy",
    "applied",
    "staleness_mean",
    "staleness_max",
)


class MetricsWriter:
    """Appends evaluation records to ``metrics.csv`` and ``metrics.jsonl`` in ``run_dir``.

    ``wall_time`` is seconds since ``start`` (default: construction). ``applied`` is the list
    of updates each server has applied; the CSV joins it with ``;``.
    """

    def __init__(self, run_dir: str | os.PathLike[str], start: float | None = None) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.start = time.monotonic() if start is None else start
        self.records: list[dict[str, Any]] = []
        csv_path = self.dir / "metrics.csv"
        new = not csv_path.exists()
        self._csv_file = open(csv_path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
        self._jsonl = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115

    def record(self, **fields: Any) -> dict[str, Any]:
        """Write one record (``step``, ``loss``, ``test_accuracy``, ... plus anything else)."""
        rec = {"wall_time": round(time.monotonic() - self.start, 4), **fields}
        self.records.append(rec)
        row = dict(rec)
        if isinstance(row.get("applied"), list):
            row["applied"] = ";".join(str(a) for a in row["applied"])
        self._csv.writerow(row)
        self._csv_file.flush()
        self._jsonl.write(json.dumps(rec, sort_keys=True) + "\n")
        self._jsonl.flush()
        return rec

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file (a torn last line from a killed writer is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
