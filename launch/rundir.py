"""Run identity and directory: ``runs/<id>/`` by default, never a finished run's directory.

A run id is ``YYYYMMDD-HHMMSS-<6 hex>`` (local time plus a random suffix, so two runs started in
the same second differ). A directory holding a finished run (:func:`is_finished`) is refused,
so nothing is overwritten; a relaunch after a failure reuses its own directory, which has no
finished summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Mapping

# The names ftmpi.record.SUMMARY and ftmpi.manifest.MANIFEST give these files, said again here
# so that asking about a run directory imports no torch: the Slurm scripts ask between a
# checkpoint and the requeue, and importing ftmpi.record takes over a second there.
SUMMARY = "summary.json"
MANIFEST = "manifest.json"

LAUNCHER_RECORD = "launcher.json"


class RunDirError(ValueError):
    """The run directory cannot be used. The message names it and the fix."""


def new_run_id() -> str:
    """A fresh run id: timestamp plus a short random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def resolve(
    run_dir: str | None, environ: Mapping[str, str], *, resume: bool = False
) -> tuple[str, str]:
    """``(run_id, run_dir)``: the id from ``FTMPI_RUN_ID``, else (resuming a run directory that
    holds a run) the id recorded there, else a new one; the directory from ``run_dir``
    (``--run-dir``), ``FTMPI_RUN_DIR`` or ``runs/<id>``. A resumed run keeps its identity, so
    its snapshots are its own."""
    directory = run_dir or environ.get("FTMPI_RUN_DIR")
    run_id = environ.get("FTMPI_RUN_ID") or (
        recorded_run_id(directory) if resume and directory else None
    )
    run_id = run_id or new_run_id()
    return run_id, directory or os.path.join("runs", run_id)


def recorded_run_id(run_dir: str) -> str | None:
    """The run id ``run_dir``'s ``launcher.json`` (else ``manifest.json``) records, if any."""
    for name in (LAUNCHER_RECORD, MANIFEST):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            with open(os.path.join(run_dir, name)) as f:
                run_id = json.load(f).get("run_id")
            if isinstance(run_id, str) and run_id:
                return run_id
    return None


def refuse_other_unfinished(run_dir: str, run_id: str) -> None:
    """Raise :class:`RunDirError` if ``run_dir`` holds another run that did not finish: its
    snapshots are what a resume of it needs, and a new run must not overwrite them."""
    other = recorded_run_id(run_dir)
    if other is not None and other != run_id and not is_finished(run_dir):
        raise RunDirError(
            f"{run_dir} holds run {other}, which did not finish; resume it with --resume, or "
            "choose another --run-dir (nothing was overwritten)"
        )


def is_finished(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a finished run: its ``summary.json`` (written by ftmpi when
    training ends) exists and says ``"finished": true``. A summary without the field (written
    by an earlier ftmpi) counts as finished; one that cannot be read as JSON does not."""
    path = os.path.join(run_dir, SUMMARY)
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("finished", True) is True


def refuse_finished(run_dir: str) -> None:
    """Raise :class:`RunDirError` if ``run_dir`` holds a finished run."""
    if is_finished(run_dir):
        raise RunDirError(
            f"{run_dir} already holds a finished run ({SUMMARY}); choose another --run-dir "
            "(nothing was overwritten)"
        )
