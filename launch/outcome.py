"""What an attempt of a job came to, from the run's own record: the exit status is the outcome.

``mpirun``'s exit status does not say whether training finished: Open MPI 5 exits 137 after a job
that survived the death of a re-spawned rank (open-mpi/ompi#13325), and 0 after its runtime ended
the whole job because a node was lost. :func:`judge` reads the run directory instead:

======  =====================================================================================
status  meaning
======  =====================================================================================
0       training finished: ``summary.json`` says every worker reached the end
1       a rank raised an uncaught exception (``fatal.json``: which rank and role, the error)
2       bad input: a configuration or storage error a rank raised (one line, no traceback)
3       the job ended before its workers finished, for no reason ftmpi could name
4       a node was lost (PRRTE lost its daemon there and ended the job)
5       a wait ran out of time (``CommTimeout``: a peer that neither answered nor died)
75      a recovery could not complete (a rank died during ``MPI_Comm_spawn``; docs/recovery.md)
128+N   ended by signal N (``ftmpi-run`` itself was interrupted, or the job was killed)
======  =====================================================================================

``python -m launch.outcome RUN_DIR [MPIRUN_STATUS]`` prints a run's outcome and exits with its
status (what the Slurm scripts end with).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ftmpi.events import read_events
from ftmpi.fatal import RAISED_EXIT, USER_ERROR_EXIT, read_fatal
from launch.rundir import MANIFEST, is_finished

FINISHED = 0
UNFINISHED = 3
NODE_LOST = 4
TIMED_OUT = 5
STUCK = 75

_LOST_DAEMON = re.compile(
    r"lost communication with a remote daemon|daemon failed to report back|"
    r"daemon has unexpectedly failed|lost connection to a remote daemon",
    re.I,
)
_REMOTE = re.compile(r"Remote daemon:.*? on node (\S+)|daemon on node (\S+)", re.I)


@dataclass(frozen=True)
class Outcome:
    """An attempt's result: the exit status and one line saying what happened."""

    status: int
    cause: str
    interrupted: bool = False
    """``ftmpi-run`` itself was interrupted (a signal to it, not to the job)."""
    nodes: tuple[str, ...] = ()
    """``NODE_LOST``: the nodes the runtime named as lost (may be empty)."""

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def retryable(self) -> bool:
        """Whether a relaunch (``--max-restarts``) can help: not after bad input, not after
        an interruption by the user."""
        return self.status not in (FINISHED, USER_ERROR_EXIT) and not self.interrupted


def exit_status(returncode: int | None) -> int:
    """A process's exit status as a shell reports it: ``128 + N`` for one killed by signal N
    (``subprocess`` reports ``-N``); 0 for ``None``."""
    return 128 - returncode if returncode is not None and returncode < 0 else int(returncode or 0)


def judge(
    run_dir: str,
    returncode: int | None,
    output: Sequence[str] = (),
    *,
    since: float = 0.0,
    signal_name: str | None = None,
    injected: Sequence[str] = (),
) -> Outcome:
    """The outcome of the attempt that started at ``since`` and ended with ``returncode``
    (negative: killed by that signal), from ``run_dir``, the attempt's ``output`` lines and
    the ``ftmpi: injected failure`` lines its ranks printed (``injected``)."""
    rc = exit_status(returncode)
    if is_finished(run_dir):
        return Outcome(FINISHED, "training finished (summary.json: every worker finished)")
    if signal_name is not None:
        code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))
        return Outcome(code, f"interrupted by {signal_name}", interrupted=True)
    fatal = read_fatal(run_dir)
    if fatal is not None and float(fatal.get("time", 0)) >= since:
        where = f"{fatal.get('role', 'a rank')} (rank {fatal.get('rank')})"
        what = f"{fatal.get('type')}: {fatal.get('message')}"
        if fatal.get("type") == "CommTimeout":
            return Outcome(TIMED_OUT, f"a wait ran out of time on {where}: {what}")
        status = USER_ERROR_EXIT if fatal.get("user_error") else RAISED_EXIT
        return Outcome(status, f"{where} raised {what}")
    text = "".join(output)
    if _LOST_DAEMON.search(text):
        names = tuple(dict.fromkeys(g for m in _REMOTE.finditer(text) for g in m.groups() if g))
        where = f"node {', '.join(names)}" if names else "a node"
        return Outcome(
            NODE_LOST,
            f"{where} was lost: Open MPI's runtime lost its daemon there and ended the whole job",
            nodes=names,
        )
    stuck = [e for e in read_events(run_dir) if e.get("event") == "recovery_stuck"]
    if any(float(e.get("time", 0)) >= since for e in stuck):
        return Outcome(
            STUCK,
            "a recovery could not complete (a rank died while a replacement was being spawned)",
        )
    after = ""
    if injected:
        specs = [line.split("injected failure: ", 1)[-1].split()[0] for line in injected]
        after = f" after the injected failure {', '.join(specs)}"
    if rc >= 128:
        return Outcome(rc, f"the job was ended by signal {rc - 128}{after} before it finished")
    if rc:
        return Outcome(rc, f"the job exited with status {rc}{after} before training finished")
    if not os.path.exists(os.path.join(run_dir, MANIFEST)):
        return Outcome(
            UNFINISHED,
            f"the job ended (mpirun status 0) without a run record in {run_dir}: does the "
            "script call ftmpi.init() (and was it given this run directory)?",
        )
    return Outcome(
        UNFINISHED,
        "the job ended (mpirun status 0) before its workers finished training (no summary.json "
        "saying so)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m launch.outcome RUN_DIR [MPIRUN_STATUS]``: print the run's outcome (judged
    from the run directory and, when given, the MPI launcher's exit status); exit with it."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2) or (len(args) == 2 and not args[1].lstrip("-").isdigit()):
        print("usage: python -m launch.outcome RUN_DIR [MPIRUN_STATUS]", file=sys.stderr)
        return 2
    outcome = judge(args[0], int(args[1]) if len(args) == 2 else 0)
    print(f"ftmpi: {args[0]}: {outcome.cause} (status {outcome.status})")
    return outcome.status


if __name__ == "__main__":
    sys.exit(main())
