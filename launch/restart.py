"""Run the job, judge what it came to, and relaunch it after a failure (``--max-restarts``).

**The exit status is the outcome** (:mod:`launch.outcome`): an attempt succeeded exactly when the
run's ``summary.json`` says every worker finished training, whatever ``mpirun`` returned; the
launcher says so in one line where the two differ. A job that finished training but does not
exit (Open MPI after a re-spawn, docs/recovery.md) is stopped after :data:`EXIT_GRACE` seconds; a
job in which a rank raised (``fatal.json``) and that is still running :data:`FATAL_GRACE`
seconds later is stopped too.

A job that did not finish (an MPI without ULFM, a failure its strategy does not survive, a lost
node, a rank that raised) is started again, up to ``max_restarts`` times, with the same
``FTMPI_RUN_ID``, run directory and ``FTMPI_JOB_START``, and with ``FTMPI_RESUME=1`` so
training continues from the newest snapshot every shard has. Kills the failed job already
carried out are not repeated: the relaunch gets the remaining schedule (see
:func:`launch.kills.remaining_schedule`). Which kills fired is read from the ``kill`` events in
``events.jsonl``: the launcher reads the job's output line by line and logs a ``kill`` event
for every ``ftmpi: injected failure: SPEC (pid N)`` line a rank prints as it dies (a kill the
rank logged itself is counted once). Bad input (status 2) and an interruption are not
relaunched.

**Signals.** The job's launcher process dies with ``ftmpi-run`` (``PR_SET_PDEATHSIG``: a
``kill -9`` of ``ftmpi-run`` sends it ``SIGTERM``, and prterun then ends every rank). ``SIGTERM``,
``SIGINT`` and ``SIGHUP`` are passed on as ``SIGTERM``; the job is killed outright if it has not
ended :data:`STOP_GRACE` seconds later, and the launcher prints the signal and the exact command
that resumes the run.

**Output.** The job's output goes through :class:`launch.noise.OutputFilter`: Open MPI's
recovery noise stays out of the terminal; all of it is kept in ``<run_dir>/job.log``.

**Lost time** of a restart is the wall time from the failed job's exit to the relaunched job's
first output (stdout or stderr, e.g. a progress bar): the time until the job runs again, which
is MPI start-up plus the script's start-up. If the relaunched job prints nothing until it ends,
it is measured to that output, or to its exit. Work redone from the snapshot onwards is not
included (it shows as the rolled-back steps).

Every attempt is recorded in ``<run_dir>/launcher.json`` as soon as it ends, so the record
survives a launcher that is itself killed later; a resumed run (``--resume`` on the same run
directory) appends its attempts to the earlier ones.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ftmpi.config import NODE_COPIES
from ftmpi.fatal import read_fatal
from ftmpi.faults import KillSpec, format_schedule
from ftmpi.fence import start_attempt
from ftmpi.lifecycle import die_with_parent
from ftmpi.manifest import write_json_atomic
from launch.kills import log_injected, logged_kills, remaining_schedule
from launch.nodes import PROBE_TIMEOUT, NodePlan, gather_node_copies, on_nodes, unreachable
from launch.noise import OutputFilter, open_log
from launch.outcome import NODE_LOST, Outcome, exit_status, judge
from launch.proctree import kill_session, kill_tree
from launch.rundir import LAUNCHER_RECORD, is_finished

EXIT_GRACE = 30.0
"""Seconds a job that finished training may take to exit before it is stopped."""
FATAL_GRACE = 5.0
"""Seconds a job may run on after a rank raised (its ``MPI_Abort`` should end it at once)."""
STOP_GRACE = 5.0
"""Seconds a job has to end after ``SIGTERM`` before every process of it is killed."""
TAIL_LINES = 400
"""Lines of an attempt's output kept to name what ended it (a lost node)."""

LOST_TIME = (
    "wall seconds from a failed job's exit to the relaunched job's first output "
    "(or its exit if it prints nothing)"
)


@dataclass
class Attempt:
    """One start of the job."""

    number: int
    command: list[str]
    kill: str
    resume: int
    started: float
    ended: float = 0.0
    returncode: int | None = None
    first_output: float | None = None
    injected: list[str] = field(default_factory=list)
    """Kill specs its ranks reported carrying out (from their output)."""
    lost_seconds: float | None = None
    """For a relaunch: see the module docstring."""
    status: int | None = None
    """The attempt's outcome (:mod:`launch.outcome`): 0 exactly when training finished."""
    cause: str = ""
    """What happened, in one line."""
    signal: str | None = None
    """The signal that interrupted ``ftmpi-run`` during this attempt, if any."""
    lost_nodes: list[str] = field(default_factory=list)
    """Nodes found lost when this attempt ended (left out of the relaunch)."""

    @property
    def wall_seconds(self) -> float:
        return round(self.ended - self.started, 3)


@dataclass
class LaunchReport:
    """What the launcher did: every attempt, the restarts and the time they lost."""

    run_id: str
    run_dir: str
    max_restarts: int
    schedule: str
    random_kills: dict[str, Any] | None
    attempts: list[Attempt] = field(default_factory=list)
    invocation: dict[str, Any] | None = None
    """How ``ftmpi-run`` was called (``argv``, ``cwd``, the caller's ``FTMPI_*`` variables,
    ``python``): what ``ftmpi-run replay`` re-runs."""

    @property
    def restarts(self) -> int:
        return max(0, len(self.attempts) - 1)

    @property
    def lost_seconds(self) -> float:
        return round(sum(a.lost_seconds or 0.0 for a in self.attempts), 3)

    earlier: list[dict[str, Any]] = field(default_factory=list)
    """Attempts of earlier launches of this run (``--resume``), as ``launcher.json`` had them."""

    @property
    def returncode(self) -> int:
        """The last attempt's outcome: 0 exactly when training finished."""
        last = self.attempts[-1] if self.attempts else None
        return 1 if last is None or last.status is None else last.status

    @property
    def mpirun_status(self) -> int | None:
        rc = self.attempts[-1].returncode if self.attempts else None
        return None if rc is None else exit_status(rc)

    def load_earlier(self) -> None:
        """Keep the attempts ``launcher.json`` already holds for this run id (a resume)."""
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads((Path(self.run_dir) / LAUNCHER_RECORD).read_text())
            if doc.get("run_id") == self.run_id:
                self.earlier = list(doc.get("earlier_attempts", [])) + list(doc.get("attempts", []))

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": self.run_dir,
            "max_restarts": self.max_restarts,
            "kill_schedule": self.schedule,
            "random_kills": self.random_kills,
            "invocation": self.invocation,
            "restarts": self.restarts,
            "lost_seconds": self.lost_seconds,
            "lost_time_definition": LOST_TIME,
            "returncode": self.returncode,
            "mpirun_status": self.mpirun_status,
            "finished": self.returncode == 0,
            "cause": self.attempts[-1].cause if self.attempts else "",
            "attempts": [{**asdict(a), "wall_seconds": a.wall_seconds} for a in self.attempts],
            "earlier_attempts": self.earlier,
        }

    def write(self) -> None:
        write_json_atomic(Path(self.run_dir) / LAUNCHER_RECORD, self.to_json())

    def final_line(self) -> str:
        cause = self.attempts[-1].cause if self.attempts else "no attempt ran"
        verdict = "finished training" if self.returncode == 0 else f"did not finish: {cause}"
        return (
            f"ftmpi-run: run {self.run_id} {verdict}; exit status {self.returncode} after "
            f"{self.restarts} restart(s), lost time {self.lost_seconds:.1f} s; "
            f"record in {Path(self.run_dir) / LAUNCHER_RECORD}"
        )


def run_with_restarts(
    make_command: Callable[[Mapping[str, str]], list[str]],
    job_env: Mapping[str, str],
    report: LaunchReport,
    *,
    schedule: Sequence[KillSpec],
    job_start: float,
    process_env: Callable[[Mapping[str, str]], dict[str, str]],
    resume_command: str | None = None,
    nodes: NodePlan | None = None,
) -> LaunchReport:
    """Start the job (``make_command(env)`` with ``process_env(env)`` as its environment),
    judge each attempt (:func:`launch.outcome.judge`) and relaunch an unfinished one up to
    ``report.max_restarts`` times; see the module docstring. Returns ``report`` filled in; its
    ``returncode`` is the outcome's status. ``resume_command`` is printed after a signal.
    ``nodes``: a multi-node job's nodes; after a lost node the relaunch leaves out the node
    named and every node that no longer answers (:mod:`launch.nodes`)."""
    remaining = list(schedule)
    while True:
        env = dict(job_env)
        env["FTMPI_KILL"] = format_schedule(remaining)
        if report.attempts:
            env["FTMPI_RESUME"] = "1"
        number = len(report.earlier) + len(report.attempts)
        env["FTMPI_ATTEMPT"] = str(number)
        start_attempt(report.run_dir, number)  # fences the older attempts' ranks (ftmpi.fence)
        cmd = make_command(env)
        print("ftmpi-run:", shlex.join(cmd), flush=True)
        attempt = Attempt(
            number=number,
            command=cmd,
            kill=env["FTMPI_KILL"],
            resume=int(env.get("FTMPI_RESUME", "0")),
            started=time.time(),
        )
        tail = run_attempt(attempt, process_env(env), report.run_dir)
        outcome = judge(
            report.run_dir,
            attempt.returncode,
            tail,
            since=attempt.started,
            signal_name=attempt.signal,
            injected=attempt.injected,
        )
        if nodes is not None and outcome.status == NODE_LOST:
            outcome = _find_lost_nodes(nodes, outcome, process_env(env))
            attempt.lost_nodes = list(outcome.nodes)
        attempt.status, attempt.cause = outcome.status, outcome.cause
        if report.attempts:
            reached = attempt.first_output or attempt.ended
            attempt.lost_seconds = round(reached - report.attempts[-1].ended, 3)
        report.attempts.append(attempt)
        report.write()
        _say_where_they_differ(attempt, outcome)
        if attempt.signal is not None:
            print(
                f"ftmpi-run: interrupted by {attempt.signal}; the job was stopped. "
                f"Resume it with: {resume_command or '(the same command with --resume)'}",
                flush=True,
            )
            break
        if outcome.finished:
            if nodes is not None and env.get("FTMPI_NODE_COPY_DIR"):
                discard_node_copies(nodes, env["FTMPI_NODE_COPY_DIR"], process_env(env))
            break
        if not outcome.retryable:
            break
        if report.restarts >= report.max_restarts:
            break
        if (
            nodes is not None
            and outcome.status == NODE_LOST
            and not _relaunch_elsewhere(
                nodes, env.get("FTMPI_NODE_COPY_DIR"), report.run_dir, process_env(env)
            )
        ):
            break
        fired = logged_kills(report.run_dir, attempt.started, attempt.ended + 1.0)
        remaining = remaining_schedule(remaining, fired, job_start=job_start, now=time.time())
        print(
            f"ftmpi-run: {outcome.cause}; restart {report.restarts + 1} of "
            f"{report.max_restarts} resumes from the newest snapshot (FTMPI_RESUME=1); kills "
            f"still to carry out: {format_schedule(remaining) or 'none'}",
            flush=True,
        )
    return report


def _relaunch_elsewhere(
    nodes: NodePlan, node_copies: str | None, run_dir: str, environ: Mapping[str, str]
) -> bool:
    """Before relaunching after a lost node: gather the chain's node copies from the usable
    nodes (``node_copies``: where servers keep them) and say where the relaunch runs; False
    when no node is left to run on."""
    if node_copies:
        names = [n.name for n in nodes.usable]
        held = gather_node_copies(names, node_copies, str(Path(run_dir) / NODE_COPIES), environ)
        where = ", ".join(held) or "no node"
        print(f"ftmpi-run: gathered the servers' node copies from {where}", flush=True)
    if not nodes.ranked:
        print("ftmpi-run: no usable node is left; not relaunching", flush=True)
        return False
    spares = f" (spares {', '.join(nodes.free_spares)})" if nodes.free_spares else ""
    print(
        f"ftmpi-run: node(s) {', '.join(nodes.lost)} left out; the relaunch runs on "
        f"{', '.join(n.name for n in nodes.ranked)}{spares}",
        flush=True,
    )
    return True


def discard_node_copies(nodes: NodePlan, node_copies: str, environ: Mapping[str, str]) -> None:
    """Training finished: remove the node copies (``node_copies``) from every usable node,
    earlier attempts' included, so no node keeps a finished run's state in its memory."""
    names = [n.name for n in nodes.usable]
    on_nodes(names, f"rm -rf {shlex.quote(node_copies)}", environ, 2 * PROBE_TIMEOUT)


def _find_lost_nodes(nodes: NodePlan, outcome: Outcome, environ: Mapping[str, str]) -> Outcome:
    """Mark lost the nodes that no longer answer the agent's probe (:mod:`launch.nodes`): a
    node the runtime named but that answers lost only its daemon (Open MPI's runtime can crash
    on a live node) and stays in use. When the probe reaches no node at all (no agent that
    works from here), the runtime's report decides. Returns the outcome naming the lost nodes."""
    usable = [n.name for n in nodes.usable]
    probed = unreachable(usable, environ)
    lost = nodes.lose(probed if len(probed) < len(usable) else list(outcome.nodes))
    kept = [n for n in outcome.nodes if n not in nodes.lost]
    if kept:
        print(f"ftmpi-run: node(s) {', '.join(kept)} still answer; they stay in use", flush=True)
    if tuple(lost) == outcome.nodes:
        return outcome
    where = f"node {', '.join(lost)} was lost" if lost else "no node was lost"
    cause = f"{where}: Open MPI's runtime lost a daemon and ended the whole job"
    return dataclasses.replace(outcome, cause=cause, nodes=tuple(lost))


def _say_where_they_differ(attempt: Attempt, outcome: Outcome) -> None:
    rc = exit_status(attempt.returncode)
    if outcome.finished and rc != 0:
        print(
            f"ftmpi-run: mpirun exited with status {rc}, but every worker finished training "
            "(summary.json), so the run succeeded (Open MPI counts ranks ftmpi replaced)",
            flush=True,
        )
    elif not outcome.finished and rc == 0:
        print(f"ftmpi-run: mpirun exited with status 0, but {outcome.cause}", flush=True)


def run_attempt(attempt: Attempt, env: Mapping[str, str], run_dir: str) -> list[str]:
    """Run ``attempt.command``, passing its output through (recovery noise to the run's log)
    and watching the run: fill in the exit status, end time, first-output time, the kills its
    ranks reported (each also logged as a ``kill`` event) and any signal that interrupted
    ``ftmpi-run``. Returns the last :data:`TAIL_LINES` lines of output. Never waits forever:
    a finished run that does not exit is stopped after :data:`EXIT_GRACE` s, a job whose rank
    raised after :data:`FATAL_GRACE` s, an interrupted one after :data:`STOP_GRACE` s. The
    job runs in a session of its own; whatever of it is left on this node once it has exited
    (an ``srun`` still waiting for a lost node's daemon) is killed."""
    proc = subprocess.Popen(
        attempt.command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        start_new_session=True,  # what it leaves behind is found by its session (below)
        preexec_fn=_die_with_parent,  # before exec: no Python runs in the child
    )
    lock = threading.Lock()
    log = open_log(run_dir)
    handled: set[int] = set()
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def fatal() -> bool:
        doc = read_fatal(run_dir)
        return doc is not None and float(doc.get("time", 0)) >= attempt.started

    def pump(src: IO[bytes], dst: IO[bytes]) -> None:
        out = OutputFilter(log, lock, handled=handled, fatal=fatal)
        pending = ""
        while chunk := src.read1(1 << 16):  # type: ignore[attr-defined]
            with lock:
                if attempt.first_output is None:
                    attempt.first_output = time.time()
            *lines, pending = (pending + chunk.decode(errors="replace")).split("\n")
            shown = []
            for line in lines:
                tail.append(line + "\n")
                if log_injected(run_dir, line) is not None:
                    with lock:
                        attempt.injected.append(line.strip())
                shown.append(out.feed(line + "\n"))
            if "\r" in pending:  # a progress bar redraws its line: show it as it comes
                head, _, pending = pending.rpartition("\r")
                shown.append(head + "\r")
            _write(dst, "".join(shown))
        _write(dst, out.feed(pending) if pending else "")
        _write(dst, out.flush())

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, sys.stdout.buffer), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, sys.stderr.buffer), daemon=True),
    ]
    for t in threads:
        t.start()
    interrupted: list[str] = []
    previous = _catch_stop_signals(interrupted)
    try:
        attempt.returncode = _watch(proc, run_dir, attempt, interrupted, fatal)
    finally:
        attempt.ended = time.time()
        if left := kill_session(proc.pid):
            print(f"ftmpi-run: stopped {len(left)} process(es) the job left behind", flush=True)
        for t in threads:
            t.join(timeout=5)
        if log is not None:
            log.close()
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
    attempt.signal = interrupted[0] if interrupted else None
    return list(tail)


def _watch(
    proc: subprocess.Popen[bytes],
    run_dir: str,
    attempt: Attempt,
    interrupted: list[str],
    fatal: Callable[[], bool],
) -> int:
    """Wait for the job, stopping it when it will not end by itself; returns its status."""
    finished_at = raised_at = stop_at = None
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.wait(timeout=0.5)
        now = time.monotonic()
        if interrupted and stop_at is None:
            stop_at = now
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if finished_at is None and is_finished(run_dir):
            finished_at = now
        if raised_at is None and fatal():
            raised_at = now
        overdue = [
            (stop_at, STOP_GRACE, "it was interrupted"),
            (finished_at, EXIT_GRACE, "training finished (summary.json) but the job did not exit"),
            (raised_at, FATAL_GRACE, "a rank raised (fatal.json) but the job did not end"),
        ]
        for since, grace, why in overdue:
            if since is not None and now - since > grace:
                if not interrupted:
                    print(f"ftmpi-run: {why} after {grace:g} s; stopping it", flush=True)
                kill_tree(proc.pid)
                return proc.wait()


def _write(dst: IO[bytes], text: str) -> None:
    if text:
        dst.write(text.encode())
        dst.flush()


def _catch_stop_signals(interrupted: list[str]) -> dict[int, Any]:
    """SIGTERM, SIGINT and SIGHUP to ``ftmpi-run`` are noted in ``interrupted`` (the watch
    loop then stops the job); returns the handlers they replaced. Off the main thread,
    nothing is changed."""
    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):

        def note(signum: int, frame: Any) -> None:
            name = signal.Signals(signum).name
            if name not in interrupted:
                interrupted.append(name)
                print(f"\nftmpi-run: {name} received; stopping the job", flush=True)

        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, note)
    return previous


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when ``ftmpi-run`` dies (even by SIGKILL),
    so prterun ends the job instead of running on without a parent (its ranks, in turn, die
    with prterun: see ``ftmpi.lifecycle.init``)."""
    die_with_parent(signal.SIGTERM)
