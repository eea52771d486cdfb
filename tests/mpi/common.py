"""What the MPI fault tests share: the workload, its length, the exit status accepted when a
re-spawned rank is killed, and readers of a run's event log."""

from __future__ import annotations

from pathlib import Path

from ftmpi.events import read_events
from tests.conftest import PROGS

PROG = str(PROGS / "ft_train.py")
STEPS = 60

# Open MPI's mpirun exits 137 when a re-spawned rank is SIGKILLed, even though the job goes on
# and finishes (open-mpi/ompi#13325; docs/recovery.md, known limitations): accepted where a
# schedule kills a replacement.
KILLED_REPLACEMENT = 137


def event_kinds(run_dir: str | Path) -> list[str]:
    """The kinds of the run's events, in order."""
    return [e["event"] for e in read_events(str(run_dir))]


def kills(run_dir: str | Path) -> list[str]:
    """The distinct kills the run's event log records (one per spec carried out)."""
    seen: list[str] = []
    for e in read_events(str(run_dir)):
        if e["event"] == "kill" and e.get("spec") not in seen:
            seen.append(e.get("spec"))
    return seen
