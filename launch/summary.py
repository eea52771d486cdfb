"""``ftmpi-run summary RUN_DIR``: one run's results, configuration, restarts and events.

Reads what the run left: ``summary.json`` (written by ftmpi when training ends, for any script,
with a trainer's own results such as ``examples/paper_trainer.py``'s), ``manifest.json`` (its
configuration), ``launcher.json`` (restarts and lost time) and ``events.jsonl`` (recovery
events). Missing files are reported as missing; a directory holding none of them is an error.
The first line after the run's name says whether it finished: ``summary.json``'s ``finished``
(every worker reached the end of training normally; :func:`launch.rundir.is_finished`).

Event counts are per event, not per rank (every rank that takes part logs a recovery; see
:func:`ftmpi.record.count_failures`), summed over the launcher's attempts: **kills** are the
distinct ``kill`` events (injected failures, whoever logged them) plus the failed ranks of a
view change that no kill explains (killed from outside the job, e.g. ``kill -9``),
**detections** the distinct views of ``failure_detected`` events, and **recoveries** the
distinct views of ``replacement_ready`` events (a re-spawn inside the job) plus the launcher's
restarts. Every event kind's raw count (one per rank that logged it) is listed as well.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ftmpi.config import Config
from ftmpi.events import read_events
from ftmpi.record import count_failures
from launch.rundir import LAUNCHER_RECORD, SUMMARY, is_finished

HEADLINE_CONFIG = ("mode", "strategy", "servers", "seed", "kill")
_DEFAULTS = {k: v for k, v in vars(Config()).items() if k != "extra"}


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def summarize(run_dir: str) -> str:
    """The summary text of ``run_dir``. Raises ``FileNotFoundError`` naming the directory if
    it holds no run."""
    summary = _read_json(os.path.join(run_dir, SUMMARY))
    manifest = _read_json(os.path.join(run_dir, "manifest.json"))
    launcher = _read_json(os.path.join(run_dir, LAUNCHER_RECORD))
    events = read_events(run_dir)
    if summary is None and manifest is None and launcher is None and not events:
        raise FileNotFoundError(
            f"{run_dir} holds no run (no {SUMMARY}, manifest.json, {LAUNCHER_RECORD} or "
            "events.jsonl); pass the directory a run wrote, e.g. runs/<run id>"
        )
    run_id = next((d["run_id"] for d in (summary, manifest, launcher) if d and "run_id" in d), "?")
    lines = [f"run {run_id} ({run_dir})", _status(run_dir, summary)]
    lines += _section("results (summary.json)", _flat(summary), f"no {SUMMARY}: not finished")
    config = (manifest or {}).get("config", {})
    shown = {k: v for k, v in config.items() if k in HEADLINE_CONFIG or _DEFAULTS.get(k, v) != v}
    lines += _section("configuration (manifest.json; defaults left out)", shown, "no manifest")
    lines += _section("launcher", _launcher_rows(launcher), f"no {LAUNCHER_RECORD}")
    lines += _section("events", _event_rows(events, launcher), "no events.jsonl")
    return "\n".join(lines)


def _status(run_dir: str, summary: dict[str, Any] | None) -> str:
    if is_finished(run_dir):
        return "status: finished (every worker reached the end of training)"
    if summary is None:
        return f"status: not finished (no {SUMMARY})"
    return f"status: not finished ({SUMMARY}: finished {summary.get('finished')})"


def _section(title: str, rows: dict[str, Any] | None, missing: str) -> list[str]:
    if rows is None:
        return ["", f"{title}: {missing}"]
    width = max((len(k) for k in rows), default=0)
    return ["", f"{title}:"] + [f"  {k:<{width}}  {_fmt(v)}" for k, v in rows.items()]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _flat(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if doc is None else dict(sorted(doc.items()))


def _launcher_rows(launcher: dict[str, Any] | None) -> dict[str, Any] | None:
    if launcher is None:
        return None
    attempts = launcher.get("attempts", [])
    return {
        "restarts": launcher.get("restarts", 0),
        "lost time s": launcher.get("lost_seconds", 0.0),
        "exit status": launcher.get("returncode"),
        "attempts": ", ".join(
            f"#{a['number']} status {a['returncode']} in {a['wall_seconds']:.1f} s"
            for a in attempts
        ),
        "kill schedule": launcher.get("kill_schedule") or "none",
    }


def _event_rows(
    events: list[dict[str, Any]], launcher: dict[str, Any] | None
) -> dict[str, Any] | None:
    if not events and launcher is None:
        return None
    starts = [float(a["started"]) for a in (launcher or {}).get("attempts", []) if "started" in a]
    jobs = [count_failures(job) for job in split_by_attempt(events, starts)]
    counts = Counter(str(e.get("event")) for e in events)
    outside = sum(1 for job in jobs for k in job["killed"] if k["source"] == "outside")
    rows: dict[str, Any] = {
        "kills": sum(job["kills"] for job in jobs),
        "detections": sum(job["detections"] for job in jobs),
        "recoveries": sum(job["recoveries"] for job in jobs) + (launcher or {}).get("restarts", 0),
    }
    if outside:
        rows["kills from outside"] = outside
    rows.update({f"  {kind}": n for kind, n in sorted(counts.items())})
    return rows


def split_by_attempt(
    events: list[dict[str, Any]], starts: list[float]
) -> list[list[dict[str, Any]]]:
    """``events`` split into the jobs the launcher started at ``starts`` (``time.time()``): an
    event belongs to the last attempt started at or before it (the first, if before all). A
    relaunch's views count from 0 again, so events are deduplicated within one job only."""
    bounds = sorted(starts)[1:]
    jobs: list[list[dict[str, Any]]] = [[] for _ in range(len(bounds) + 1)]
    for e in events:
        t = float(e.get("time", 0.0))
        jobs[sum(1 for b in bounds if b <= t)].append(e)
    return jobs


def main(argv: Sequence[str]) -> int:
    """Entry point of ``ftmpi-run summary``."""
    p = argparse.ArgumentParser(
        prog="ftmpi-run summary", description="Print a run's summary table."
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory, e.g. runs/<run id>")
    args = p.parse_args(list(argv))
    if not os.path.isdir(args.run_dir):
        raise SystemExit(f"ftmpi-run summary: {args.run_dir} is not a directory")
    try:
        print(summarize(args.run_dir))
    except FileNotFoundError as exc:
        raise SystemExit(f"ftmpi-run summary: {exc}") from None
    return 0
