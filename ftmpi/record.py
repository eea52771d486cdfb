"""The run's record at the end of training, for any script: ``<run_dir>/summary.json`` and the
manifest's outcome, written by ftmpi itself.

:func:`finish` runs in :func:`ftmpi.shutdown` (at exit on every worker, or when the script
calls it). Every worker reports to worker 0 whether it finished normally (it reached shutdown
without an uncaught exception), how many steps its :func:`ftmpi.DistributedOptimizer` took
(``position``) and the SHA-256 of its parameters (:func:`ftmpi.manifest.named_sha256`: names
and raw bytes, in name order; the same value as :func:`ftmpi.manifest.weights_sha256` of a model
without buffers). The reports travel as non-blocking messages on the workers' communicator and
worker 0 waits for them at most ``config.timeout`` seconds in all. Worker 0 then writes
``summary.json``:

- ``finished``: every live worker reported that it finished normally. A worker whose report
  failed with a peer failure has died and is listed in ``workers_lost`` (it does not count); one
  that sent nothing before the deadline is listed in ``workers_silent`` and makes ``finished``
  false;
- ``steps``, ``weights_sha256`` (worker 0's), ``workers_agree`` (every report's hash equal;
  ``None`` without an optimizer), ``reports`` (each worker's);
- ``run_id``, ``workers``, ``servers``, ``backend`` (the backend at the end), ``mode``,
  ``backend_fallback`` (the detail of the first ``backend_fallback`` event, else ``None``),
  ``backend_restarts`` (recoveries after which worker 0 initialised Horovod again);
- ``failures``: this job's failures counted per event, not per rank (:func:`count_failures`);
- the trainer's own fields (:func:`add_summary`, :func:`add_outcome`), which take precedence over
  ftmpi's of the same name, except ``finished``, ``failures``, ``workers_agree`` and ``reports``.

It also records the outcome in ``manifest.json`` (:func:`ftmpi.manifest.record_outcome`).
:func:`finish` never raises: a record that cannot be written is reported on standard error, and
the run then has no ``summary.json`` (it counts as not finished). A job whose worker 0 died
writes no summary.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ftmpi.events import read_events
from ftmpi.fence import fenced_message, superseded
from ftmpi.manifest import (
    MANIFEST,
    default_run_dir,
    named_sha256,
    read_manifest,
    record_outcome,
    write_json_atomic,
    written_run_dir,
)

if TYPE_CHECKING:
    import torch

    from ftmpi.runtime import Runtime

SUMMARY = "summary.json"
TAG_RECORD = 7010
"""Message tag of the end-of-training reports on the workers' communicator."""
KILL_SLACK_S = 5.0
"""A ``kill`` event explains a failed rank of a view change at most this many seconds after it
(the launcher stamps its own ``kill`` event when it reads the dying rank's last line)."""
FTMPI_OWN = ("finished", "failures", "workers_agree", "reports")
"""Summary fields a trainer's own fields do not replace."""
SERVER_ROLES = ("server", "head", "tail")

_REPORT_BYTES = 48  # finished, has steps, has hash, 5 spare, int64 steps, 32-byte digest
_optimizer: Any = None
_summary: dict[str, Any] = {}
_outcome: dict[str, Any] = {}


def track(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer`` (a :func:`ftmpi.DistributedOptimizer`) the one whose steps and
    weights the record reports; the last one created wins. The record keeps it (and so its
    parameters) alive until exit: a script's ``main()`` has usually returned by then."""
    global _optimizer
    _optimizer = optimizer


def add_summary(**fields: Any) -> None:
    """Add a trainer's fields to ``summary.json`` (worker 0's count; a later call replaces a
    field of the same name). Values must be JSON-serialisable (others are written as text)."""
    _summary.update(fields)


def add_outcome(**fields: Any) -> None:
    """Like :func:`add_summary`, and also record the fields in ``manifest.json``'s outcome."""
    _summary.update(fields)
    _outcome.update(fields)


@dataclass(frozen=True)
class Report:
    """One worker's end of training."""

    finished: bool
    steps: int | None
    weights_sha256: str | None

    def encode(self) -> np.ndarray:
        buf = np.zeros(_REPORT_BYTES, dtype=np.uint8)
        buf[0] = int(self.finished)
        buf[1] = int(self.steps is not None)
        buf[2] = int(self.weights_sha256 is not None)
        buf[8:16] = np.frombuffer(np.int64(self.steps or 0).tobytes(), dtype=np.uint8)
        if self.weights_sha256 is not None:
            buf[16:48] = np.frombuffer(bytes.fromhex(self.weights_sha256), dtype=np.uint8)
        return buf

    @classmethod
    def decode(cls, buf: np.ndarray) -> Report:
        steps = int(buf[8:16].view(np.int64)[0]) if buf[1] else None
        return cls(bool(buf[0]), steps, buf[16:48].tobytes().hex() if buf[2] else None)

    def as_dict(self, worker: int) -> dict[str, Any]:
        return {
            "worker": worker,
            "finished": self.finished,
            "steps": self.steps,
            "weights_sha256": self.weights_sha256,
        }


def raised() -> bool:
    """Whether this process had an uncaught exception: :data:`ftmpi.fatal.raised`, or the
    interpreter's record of one it printed (``sys.last_value``)."""
    try:
        from ftmpi import fatal
    except ImportError:
        fatal = None  # type: ignore[assignment]
    return bool(getattr(fatal, "raised", False)) or getattr(sys, "last_value", None) is not None


def own_report() -> Report:
    """This worker's report: finished normally, steps and weights hash of the tracked optimizer
    (``None`` for both without one)."""
    opt = _optimizer
    if opt is None:
        return Report(not raised(), None, None)
    return Report(not raised(), int(opt.position), named_sha256(opt.parameters_by_name.items()))


def finish(rt: Runtime) -> dict[str, Any] | None:
    """Exchange the reports and, on worker 0, write ``summary.json`` and the manifest's
    outcome; returns the summary there, ``None`` elsewhere (see the module docstring).
    Never raises."""
    try:
        return _finish(rt)
    except Exception as exc:  # at exit: say why, and let shutdown stop the servers
        print(
            f"ftmpi: worker {rt.role_rank}: the run's record was not written: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
            flush=True,
        )
        return None


def _finish(rt: Runtime) -> dict[str, Any] | None:
    from ftmpi.wire import CommTimeout, PeerFailure, wait_all

    global _sent
    own = own_report()
    timeout = rt.config.timeout
    if rt.role_rank != 0:
        _sent = own.encode()
        req = rt.group.Isend(_sent, dest=0, tag=TAG_RECORD)
        with contextlib.suppress(PeerFailure, CommTimeout):  # worker 0 gone: no summary
            wait_all([req], timeout, "sending the end-of-training report to worker 0")
        return None
    reports: dict[int, Report] = {0: own}
    lost: list[int] = []
    silent: list[int] = []
    bufs = {i: np.zeros(_REPORT_BYTES, dtype=np.uint8) for i in range(1, rt.num_workers)}
    reqs = {i: rt.group.Irecv(buf, source=i, tag=TAG_RECORD) for i, buf in bufs.items()}
    deadline = time.monotonic() + timeout
    for i, req in reqs.items():
        try:
            left = max(0.0, deadline - time.monotonic())
            wait_all([req], left, f"worker {i}'s end-of-training report")
            reports[i] = Report.decode(bufs[i])
        except PeerFailure:
            lost.append(i)
        except CommTimeout:
            silent.append(i)
    run_dir = written_run_dir() or default_run_dir(rt)
    doc = summary(rt, reports, lost=lost, silent=silent)
    newer = superseded(run_dir, rt.config.attempt)
    if newer is not None:
        print(f"ftmpi: {fenced_message('summary.json', rt.config.attempt, newer)}", file=sys.stderr)
        return doc
    write_json_atomic(os.path.join(run_dir, SUMMARY), doc)
    if os.path.exists(os.path.join(run_dir, MANIFEST)):
        ftmpi_outcome = {
            k: doc[k] for k in ("finished", "steps", "weights_sha256", "workers_agree")
        }
        record_outcome(run_dir, {**ftmpi_outcome, **_outcome, "finished": doc["finished"]})
    return doc


_sent: np.ndarray | None = None
"""This worker's end-of-training report as sent to worker 0 (workers other than 0)."""


def report_again(rt: Runtime) -> None:
    """After a recovery at exit (this worker finished while another still trains): send the
    end-of-training report to worker 0 again, on the new view's communicator; the one sent
    before went with the old one. Never raises."""
    from ftmpi.wire import wait_all

    if _sent is None or rt.is_server or rt.role_rank == 0:
        return
    with contextlib.suppress(Exception):
        req = rt.group.Isend(_sent, dest=0, tag=TAG_RECORD)
        wait_all([req], rt.config.timeout, "sending the end-of-training report again")


def summary(
    rt: Runtime, reports: Mapping[int, Report], *, lost: Iterable[int], silent: Iterable[int]
) -> dict[str, Any]:
    """The ``summary.json`` document from the workers' reports (worker 0's is ``reports[0]``)."""
    lost, silent = sorted(lost), sorted(silent)
    events = _this_job_events(rt)
    hashes = {r.weights_sha256 for r in reports.values()}
    fallback = next((e for e in events if e.get("event") == "backend_fallback"), None)
    doc: dict[str, Any] = {
        "run_id": rt.run_id,
        "finished": not silent and all(r.finished for r in reports.values()),
        "steps": reports[0].steps,
        "weights_sha256": reports[0].weights_sha256,
        "workers_agree": None if None in hashes else len(hashes) == 1,
        "reports": [reports[i].as_dict(i) for i in sorted(reports)],
        "workers_lost": lost,
        "workers_silent": silent,
        "workers": rt.num_workers,
        "servers": rt.num_servers,
        "backend": rt.backend.name if rt.backend else "none",
        "backend_fallback": fallback.get("detail", True) if fallback else None,
        "backend_restarts": sum(
            e.get("event") == "backend_restarted" and e.get("role") == "worker 0" for e in events
        ),
        "mode": rt.config.mode,
        "failures": count_failures(events),
    }
    own = {k: doc[k] for k in FTMPI_OWN}
    return {**doc, **_summary, **own}


def _this_job_events(rt: Runtime) -> list[dict[str, Any]]:
    """The events of this job: since its manifest was written (a relaunch appends to the same
    log), all of them without a manifest."""
    if not rt.config.run_dir:
        return []
    since = 0.0
    manifest = os.path.join(written_run_dir() or default_run_dir(rt), MANIFEST)
    if os.path.exists(manifest):
        since = float(read_manifest(manifest).get("started") or 0.0)
    return [e for e in read_events(rt.config.run_dir) if float(e.get("time", 0.0)) >= since]


def count_failures(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One job's failures from its events, counted per event, not per rank.

    Every rank that takes part logs a recovery, so events are deduplicated: a ``view_change``
    (fields ``view``, ``failed_workers``, ``failed_servers``) counts once per view, as do
    ``failure_detected`` (``detections``) and ``replacement_ready`` (``recoveries``: re-spawns
    inside the job); an event without a ``view`` field counts on its own. A ``kill`` (an
    injected failure, logged by the dying rank and by the launcher) counts once per (pid, spec).
    A failed rank of a view change that no earlier ``kill`` of its role explains (at most
    :data:`KILL_SLACK_S` later, earliest first) was killed from outside the job: it is listed
    as a kill with ``source`` ``outside``.

    Returns ``view_changes``, ``failed_workers``, ``failed_servers``, ``detections``,
    ``recoveries``, ``kills`` (the number) and ``killed`` (each kill: ``spec`` and ``source``
    ``injected``, or ``role``, ``index``, ``view`` and ``source`` ``outside``; in time order).
    Events of several jobs (a relaunched run's log) must be split first.
    """
    from ftmpi.faults import parse_spec

    views: dict[Any, Mapping[str, Any]] = {}
    detected: set[Any] = set()
    recovered: set[Any] = set()
    injected: list[dict[str, Any]] = []
    seen: set[tuple[Any, str]] = set()
    for n, e in enumerate(sorted(events, key=lambda e: float(e.get("time", 0.0)))):
        kind = e.get("event")
        view = e.get("view", ("no view", n))  # an event without a view counts on its own
        if kind == "view_change":
            views.setdefault(view, e)
        elif kind == "failure_detected":
            detected.add(view)
        elif kind == "replacement_ready":
            recovered.add(view)
        elif kind == "kill" and isinstance(e.get("spec"), str):
            key = (e.get("pid"), e["spec"])
            if e.get("pid") is not None and key in seen:
                continue
            seen.add(key)
            try:
                role = parse_spec(e["spec"]).role
            except ValueError:
                role = "?"
            role = "server" if role in SERVER_ROLES else role
            injected.append(
                {"spec": e["spec"], "source": "injected", "time": e.get("time"), "_role": role}
            )
    unexplained = list(injected)
    outside: list[dict[str, Any]] = []
    for view, e in views.items():
        at = float(e.get("time", 0.0))
        for victim, failed in (("worker", "failed_workers"), ("server", "failed_servers")):
            for index in e.get(failed) or []:
                kill = _explaining(unexplained, victim, at)
                if kill is not None:
                    unexplained.remove(kill)
                else:
                    outside.append(
                        {
                            "role": victim,
                            "index": index,
                            "view": view,
                            "time": at,
                            "source": "outside",
                        }
                    )
    killed = sorted(
        [{k: v for k, v in kill.items() if k != "_role"} for kill in injected] + outside,
        key=lambda k: float(k.get("time") or 0.0),
    )
    return {
        "view_changes": len(views),
        "failed_workers": sum(len(e.get("failed_workers") or []) for e in views.values()),
        "failed_servers": sum(len(e.get("failed_servers") or []) for e in views.values()),
        "detections": len(detected),
        "recoveries": len(recovered),
        "kills": len(killed),
        "killed": killed,
    }


def _explaining(kills: list[dict[str, Any]], role: str, at: float) -> dict[str, Any] | None:
    """The earliest kill of ``role`` logged before ``at`` (within :data:`KILL_SLACK_S`)."""
    for kill in kills:
        if kill["_role"] == role and float(kill["time"] or 0.0) <= at + KILL_SLACK_S:
            return kill
    return None
