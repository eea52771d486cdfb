"""What one experiment cell's run directory says, reduced to a results-table row.

Reads the files a run of ``examples/paper_trainer.py`` under ``ftmpi-run`` leaves (``summary.json``,
``metrics.jsonl``, ``steps.csv``, ``events.jsonl``, ``resources/``) plus the experiment's
``cell.json``. Times are seconds on the paper's clock: zero is the moment training was to start
(the cell's launch plus its kill offset), the origin of the kill schedule. Definitions:

- **failure band**: from a distinct ``kill`` event to the first ``replacement_ready`` event after
  it (the replacement has joined), or to the run's end if none came. Several ranks log
  ``replacement_ready`` for one recovery; the first counts.
- **worker idle seconds**: time worker 0 spent waiting for the servers to recover. From
  ``steps.csv``, a step's *period* runs from the end of the step before it (or its own start) to
  its own end, so it includes a wait inside the step and a wait between steps (a step abandoned
  by a rollback is not logged; its time falls in the next logged step's period). Every period
  that overlaps a failure band contributes its length beyond the run's median period; periods
  outside the bands contribute nothing, so ordinary jitter, evaluations and snapshot writes are
  not counted. A stateless worker that keeps computing through a band accumulates almost none.
- **updates lost**: updates the workers computed and a server applied whose effect is not in the
  final model: worker 0's steps (redone steps after a rollback included, and gradients logged
  while a server was down, which a replacement applies later) times the workers in async mode,
  minus the final shard version (updates in the final model's history; a replayed gradient log
  counts every gradient in it), over the shards the run ended with, taking the smallest.
  ``checkpoint``: the steps a rollback redoes; ``chain`` with ``next`` acks: the updates the dead
  head had not forwarded; ``stateless``: 0 when every logged gradient was replayed. Exact with one
  worker (the paper's setup) and in sync mode.
- **time to target**: seconds from worker 0's first training step until the first evaluation at
  or above the target accuracy; empty if never reached.
- **late start**: seconds training started after the paper clock's zero (an MPI start-up slower
  than the kill offset; the kills then come that much earlier in training).
- **gradients computed**: backward passes over all workers (worker 0's count times the worker
  count); **gradients replayed**: logged gradients the replacements applied (``log_replayed``).
- **CPU** and **memory**: per process (``resources/rank-<pid>.csv``), the mean CPU percent (100 =
  one core) and peak resident set; the row gives the mean over worker processes and over server
  processes (replacements included) and the peak over each.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ftmpi.events import read_events
from ftmpi.metrics import read_jsonl
from ftmpi.resources import read_samples
from launch.kills import kill_events

CELL_RECORD = "cell.json"
STEP_LOG = "steps.csv"

COLUMNS = (
    "cell",
    "strategy",
    "mode",
    "kills",
    "status",
    "final_accuracy",
    "best_accuracy",
    "time_to_target_s",
    "late_start_s",
    "steps",
    "steps_per_s",
    "gradients_computed",
    "updates_applied",
    "gradients_replayed",
    "updates_lost",
    "worker_idle_s",
    "recoveries",
    "worker_cpu_pct",
    "server_cpu_pct",
    "worker_peak_rss_mb",
    "server_peak_rss_mb",
)
"""The results table's columns, in order (CSV header and Markdown table)."""


@dataclass(frozen=True)
class Step:
    """One training step of worker 0: its data position and wall-clock start and end."""

    step: int
    start: float
    end: float


def read_step_log(run_dir: str) -> list[Step]:
    """``steps.csv`` of a run (empty if missing)."""
    path = os.path.join(run_dir, STEP_LOG)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [Step(int(r["step"]), float(r["start"]), float(r["end"])) for r in csv.DictReader(f)]


def recoveries(events: Sequence[dict[str, Any]]) -> list[tuple[float, float | None]]:
    """``(kill time, first replacement_ready after it, or None)`` per distinct kill, in time
    order. Absolute (event-log) times."""
    kills = sorted(float(e["time"]) for e, _ in kill_events(events))
    ready = sorted(float(e["time"]) for e in events if e.get("event") == "replacement_ready")
    return [(k, next((t for t in ready if t > k), None)) for k in kills]


def failure_bands(events: Sequence[dict[str, Any]], end: float) -> list[tuple[float, float]]:
    """The failure bands (module docstring): :func:`recoveries` with ``end`` standing in for a
    recovery that never came."""
    return [(k, end if r is None else r) for k, r in recoveries(events)]


def idle_seconds(steps: Sequence[Step], bands: Sequence[tuple[float, float]]) -> float:
    """Worker idle seconds (module docstring): excess over the median step period of every
    period overlapping a failure band."""
    if not steps or not bands:
        return 0.0
    ordered = sorted(steps, key=lambda s: s.end)
    starts = [ordered[0].start] + [s.end for s in ordered[:-1]]
    periods = [(a, s.end) for a, s in zip(starts, ordered, strict=True)]
    typical = statistics.median(b - a for a, b in periods)
    return sum(
        max(0.0, (b - a) - typical)
        for a, b in periods
        if any(b > lo and a < hi for lo, hi in bands)
    )


def updates_lost(steps_run: int, workers: int, mode: str, versions: Sequence[int]) -> int | None:
    """Updates lost (module docstring) from worker 0's step count and the final shard
    versions; ``None`` without versions."""
    if not versions:
        return None
    pushed = steps_run * workers if mode == "async" else steps_run
    return max(0, pushed - min(versions))


def time_to_target(
    records: Sequence[dict[str, Any]], target: float, offset: float = 0.0
) -> float | None:
    """``wall_time + offset`` of the first evaluation with ``test_accuracy >= target``."""
    return next(
        (float(r["wall_time"]) + offset for r in records if r["test_accuracy"] >= target), None
    )


def resource_summary(samples: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per process: its role (``worker``/``server N``, the last one it reported), mean CPU
    percent and peak RSS bytes."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    out = {}
    for pid, rows in sorted(by_pid.items()):
        roles = [r["role"] for r in rows if r["role"] != "starting"]
        out[pid] = {
            "role": roles[-1] if roles else "starting",
            "cpu_percent": statistics.fmean(r["cpu_percent"] for r in rows),
            "peak_rss_bytes": max(r["rss_bytes"] for r in rows),
        }
    return out


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


@dataclass
class RunData:
    """Everything read from one cell's run directory."""

    run_dir: str
    cell: dict[str, Any]
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    events: list[dict[str, Any]]
    steps: list[Step]
    samples: list[dict[str, Any]]

    @property
    def origin(self) -> float:
        """Wall-clock time of the paper clock's zero (launch plus kill offset)."""
        return float(self.cell.get("clock_zero", self.cell["job_start"]))

    @property
    def metrics_origin(self) -> float:
        """Wall-clock time of the zero of ``metrics.jsonl``'s ``wall_time``."""
        if self.summary and "metrics_origin" in self.summary:
            return float(self.summary["metrics_origin"])
        return self.origin

    @property
    def training_origin(self) -> float:
        """Wall-clock time worker 0 started its first training step."""
        return self.steps[0].start if self.steps else self.metrics_origin

    @property
    def end(self) -> float:
        """Wall-clock time the run's last record was made."""
        times = [self.origin, *(float(e["time"]) for e in self.events)]
        times += [s.end for s in self.steps[-1:]] + [s["time"] for s in self.samples[-1:]]
        return max(times)

    def bands(self) -> list[tuple[float, float]]:
        """Failure bands in absolute time."""
        return failure_bands(self.events, self.end)


def load_run(run_dir: str) -> RunData:
    """Read a cell's run directory. Raises ``FileNotFoundError`` if it has no ``cell.json``."""
    cell = _read_json(os.path.join(run_dir, CELL_RECORD))
    if cell is None:
        raise FileNotFoundError(f"{run_dir} has no {CELL_RECORD}: not an experiment cell")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    return RunData(
        run_dir=run_dir,
        cell=cell,
        summary=_read_json(os.path.join(run_dir, "summary.json")),
        metrics=read_jsonl(metrics_path) if os.path.exists(metrics_path) else [],
        events=read_events(run_dir),
        steps=read_step_log(run_dir),
        samples=read_samples(run_dir),
    )


def row(run: RunData, target: float) -> dict[str, Any]:
    """The results-table row of one cell (:data:`COLUMNS`; ``None`` where the run has no data)."""
    cell, summary = run.cell, run.summary or {}
    accs = [float(r["test_accuracy"]) for r in run.metrics]
    resources = resource_summary(run.samples)
    by_role: dict[str, list[dict[str, Any]]] = {"worker": [], "server": []}
    for r in resources.values():
        kind = r["role"].split()[0]
        if kind in by_role:
            by_role[kind].append(r)
    ttt = time_to_target(run.metrics, target, run.metrics_origin - run.training_origin)
    sps = summary.get("steps_per_second")
    out: dict[str, Any] = {
        "cell": cell["name"],
        "strategy": cell["strategy"],
        "mode": cell["mode"],
        "kills": cell["kills"],
        "status": cell.get("status", "not run"),
        "final_accuracy": summary.get("final_test_accuracy"),
        "best_accuracy": max(accs) if accs else None,
        "time_to_target_s": None if ttt is None else round(ttt, 2),
        "late_start_s": round(max(0.0, run.training_origin - run.origin), 2) if summary else None,
        "steps": summary.get("steps"),
        "steps_per_s": None if sps is None else round(sps, 1),
        "gradients_computed": summary.get("gradients_computed"),
        "updates_applied": min(summary["versions"]) if summary.get("versions") else None,
        "gradients_replayed": sum(
            int(e.get("count", 0)) for e in run.events if e.get("event") == "log_replayed"
        ),
        "updates_lost": updates_lost(
            len(run.steps),
            int(summary.get("workers", 1)),
            str(summary.get("mode", cell["mode"])),
            summary.get("versions") or [],
        )
        if summary
        else None,
        "worker_idle_s": round(idle_seconds(run.steps, run.bands()), 2) if run.steps else None,
        "recoveries": sum(r is not None for _, r in recoveries(run.events)),
    }
    for kind, rows in by_role.items():
        out[f"{kind}_cpu_pct"] = (
            round(statistics.fmean(r["cpu_percent"] for r in rows), 1) if rows else None
        )
        out[f"{kind}_peak_rss_mb"] = (
            round(max(r["peak_rss_bytes"] for r in rows) / 2**20, 1) if rows else None
        )
    return {c: out[c] for c in COLUMNS}


def rank_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per process of a cell: role, mean CPU percent, peak RSS in MiB."""
    return [
        {
            "cell": run.cell["name"],
            "pid": pid,
            "role": r["role"],
            "cpu_pct": round(r["cpu_percent"], 1),
            "peak_rss_mb": round(r["peak_rss_bytes"] / 2**20, 1),
        }
        for pid, r in resource_summary(run.samples).items()
    ]


def write_csv(path: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """``rows`` as CSV with ``columns`` (``None`` as an empty field)."""
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        out.writeheader()
        out.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """``rows`` as a Markdown table (``None`` as ``-``; the status column's ``|`` escaped)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1 else f"{v:.1f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
