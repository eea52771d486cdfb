"""Run identity and directory: ``runs/<id>/`` by default, never a finished run's directory.

A run id is ``YYYYMMDD-HHMMSS-<6 hex>`` (local time plus a random suffix, so two runs started in
the same second differ). A directory holding ``summary.json`` holds a finished run and is
refused, so nothing is overwritten; a relaunch after a failure reuses its own directory, which
has no summary yet.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping

SUMMARY = "summary.json"
LAUNCHER_RECORD = "launcher.json"


class RunDirError(ValueError):
    """The run directory cannot be used. The message names it and the fix."""


def new_run_id() -> str:
    """A fresh run id: timestamp plus a short random suffix."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def resolve(run_dir: str | None, environ: Mapping[str, str]) -> tuple[str, str]:
    """``(run_id, run_dir)``: the id from ``FTMPI_RUN_ID`` or a new one; the directory from
    ``run_dir`` (``--run-dir``), ``FTMPI_RUN_DIR`` or ``runs/<id>``."""
    run_id = environ.get("FTMPI_RUN_ID") or new_run_id()
    return run_id, run_dir or environ.get("FTMPI_RUN_DIR") or os.path.join("runs", run_id)


def is_finished(run_dir: str) -> bool:
    """Whether ``run_dir`` holds a finished run (its trainer wrote ``summary.json``)."""
    return os.path.exists(os.path.join(run_dir, SUMMARY))


def refuse_finished(run_dir: str) -> None:
    """Raise :class:`RunDirError` if ``run_dir`` holds a finished run."""
    if is_finished(run_dir):
        raise RunDirError(
            f"{run_dir} already holds a finished run ({SUMMARY}); choose another --run-dir "
            "(nothing was overwritten)"
        )
