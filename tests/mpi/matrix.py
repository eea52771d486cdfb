"""The fault matrix: strategy x mode x victim x moment, each cell a real-SIGKILL run of
tests/mpi/progs/ft_train.py checked against its strategy's invariants.

Cells that cannot happen are never generated (a chain middle without a chain, a snapshot write
without snapshots, a pull-time death where workers do not pull after a recovery). ``ci_slice()``
picks a deterministic subset in which every strategy, mode, victim and moment appears at least
once; ``python -m tests.mpi.matrix --full`` runs every cell and prints a summary (``--ci`` the
slice, ``--list`` only lists).

Victims: ``head``, ``middle``, ``tail`` (chain positions; without a chain the one server of
shard 0 is the head), ``worker`` (worker 1, or for a push in a sync chain the pushing worker 0;
a replacement is spawned so the run can be compared with the one without failure), ``two`` (two
servers at once), ``twice`` (the same server, then its replacement). Moments: ``push`` (a server
dies with a push applied and unanswered, a worker with its push in flight), ``pull`` (worker 1
dies pulling the restored weights after a server death), ``snapshot_write`` (after the temporary
file is fsynced, before the rename), ``reconfigure`` (a chain member dies while reconfiguring
after another death), ``state_transfer`` (the sender dies between the header and the bytes of a
replacement's state transfer), ``step`` and ``time`` (``FTMPI_KILL``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftmpi.events import read_events
from tests.mpi.common import KILLED_REPLACEMENT, PROG, STEPS, kills

KILL_STEP = 37
"""Step (server update) of scheduled kills: not a checkpoint boundary, past the first 30."""
HIT = 20
"""Pass of a failpoint at which it fires (a push or an apply in the middle of the run)."""
KILL_SECONDS = 4
"""Time of ``time`` kills, from the job's start: past the ranks' start-up (about 2 s on 2 quiet
cores), inside training slowed to 0.1 s a step (:meth:`Cell.extra`). A slot whose time is
past when it starts dies at once."""


@dataclass(frozen=True)
class Strategy:
    name: str
    env: dict[str, str]
    servers: int
    chain: bool = False
    exact: bool = False
    """Sync mode ends bit-for-bit equal to the run without failure."""
    lost_bound: int | None = None
    """At most this many updates may be lost (chain with ``next`` ack, whole states every N)."""
    stateless: bool = False
    extra: tuple[str, ...] = ()


STRATEGIES = {
    s.name: s
    for s in (
        Strategy(
            "checkpoint",
            {"FTMPI_STRATEGY": "checkpoint", "FTMPI_CHECKPOINT_EVERY": "10"},
            servers=2,
            exact=True,
        ),
        Strategy(
            "chain",
            {"FTMPI_STRATEGY": "chain", "FTMPI_CHAIN_LENGTH": "3"},
            servers=3,
            chain=True,
            exact=True,
        ),
        Strategy(
            "chain-next",
            {
                "FTMPI_STRATEGY": "chain",
                "FTMPI_CHAIN_LENGTH": "3",
                "FTMPI_CHAIN_ACK": "next",
                "FTMPI_REPLICATE_EVERY": "5",
            },
            servers=3,
            chain=True,
            lost_bound=9,  # under 2N: the successor has one of the head's last two states
        ),
        Strategy(
            "stateless",
            {"FTMPI_STRATEGY": "stateless", "FTMPI_DOWN_FOR": "1.5"},
            servers=2,
            stateless=True,
            extra=("--step-sleep", "0.03"),
        ),
        Strategy(
            # chains of one: a death loses a whole chain, which is rebuilt as stateless
            "chain+stateless",
            {
                "FTMPI_STRATEGY": "chain+stateless",
                "FTMPI_CHAIN_LENGTH": "1",
                "FTMPI_DOWN_FOR": "1.5",
            },
            servers=2,
            stateless=True,
            extra=("--step-sleep", "0.03"),
        ),
    )
}
MODES = ("sync", "async")
VICTIMS = ("head", "middle", "tail", "worker", "two", "twice")
MOMENTS = (
    "push",
    "answered",
    "pull",
    "snapshot_write",
    "reconfigure",
    "state_transfer",
    "step",
    "time",
)


@dataclass(frozen=True)
class Cell:
    strategy: str
    mode: str
    victim: str
    moment: str
    kill: str = ""
    failpoints: str = ""
    expected_kills: int = 1

    @property
    def id(self) -> str:
        return f"{self.strategy}-{self.mode}-{self.victim}-{self.moment}"

    @property
    def codes(self) -> tuple[int, ...]:
        """Exit statuses accepted: 137 only where a re-spawned rank is killed."""
        return (0, KILLED_REPLACEMENT) if self.victim == "twice" else (0,)

    def extra(self) -> tuple[str, ...]:
        """Arguments of ft_train.py beyond the strategy's: a ``time`` kill needs training
        that lasts past it (60 steps take under a second on a quiet machine)."""
        return ("--step-sleep", "0.1") if self.moment == "time" else ()

    def env(self) -> dict[str, str]:
        s = STRATEGIES[self.strategy]
        env = {**s.env, "FTMPI_MODE": self.mode}
        if self.kill:
            env["FTMPI_KILL"] = self.kill
        if self.failpoints:
            env["FTMPI_FAILPOINTS"] = self.failpoints
        if self.victim == "worker":
            env["FTMPI_RESPAWN_WORKERS"] = "1"
            # the replacement comes at the next step: a stateless job's outage (1.5 s) can
            # outlast the remaining steps, and the job would rightly end with one worker
            env["FTMPI_DOWN_FOR"] = "0"
        if self.moment == "pull":
            env["FTMPI_DOWN_FOR"] = "0.5"  # the replacement comes well before the last step
        return env


def _slots(s: Strategy, victim: str) -> list[int] | None:
    """Server slots a server victim names (head, middle, tail of shard 0's chain; two)."""
    last = s.servers - 1
    return {
        "head": [0],
        "middle": [1] if s.chain else None,
        "tail": [last] if s.chain else None,
        "two": [0, last],
        "twice": [0, 0],
    }[victim]


def _positional(s: Strategy, victim: str) -> str:
    """The kill-spec role naming the victim by its position (exercises head/tail specs)."""
    return {"head": "head:0", "tail": "tail:0"}.get(victim, f"server:{_slots(s, victim)[0]}")


def _make(s: Strategy, mode: str, victim: str, moment: str) -> Cell | None:
    def cell(kill: str = "", fps: str = "", n: int = 1) -> Cell:
        return Cell(s.name, mode, victim, moment, kill, fps, n)

    if victim == "worker":
        if s.lost_bound is not None:
            return None
        # in sync mode only a shard's leader (worker shard % 2) pushes: one chain is one shard,
        # led by worker 0
        pusher = 0 if s.chain and mode == "sync" else 1
        return {
            "push": cell(fps=f"push@worker:{pusher}#{HIT}"),
            # workers pull after a checkpoint rollback or a stateless rebuild, not after a
            # chain failover (they retry the push)
            # the server dies early (step HIT) so that its replacement, and the pull worker 1
            # dies in, come before the last step even on a fast machine
            "pull": None
            if s.chain
            else cell(kill=f"server:0@step={HIT}", fps="pull@worker:1", n=2),
            "step": cell(kill=f"worker:1@step={KILL_STEP}"),
            "time": cell(kill=f"worker:1@{KILL_SECONDS}s"),
        }.get(moment)
    if s.lost_bound is not None and victim not in ("head", "twice"):
        return None  # beyond chain: the loss bound is about the head's death
    slots = _slots(s, victim)
    if slots is None:
        return None
    n = len(slots)
    if moment == "step":
        if victim == "twice":
            return cell(kill=f"server:0@step={KILL_STEP - 17},server:0@step={KILL_STEP}", n=2)
        if victim == "two":
            return cell(kill=",".join(f"server:{k}@step={KILL_STEP}" for k in slots), n=2)
        return cell(kill=f"{_positional(s, victim)}@step={KILL_STEP}")
    if victim == "twice":
        return None
    if moment == "time":
        return cell(kill=",".join(f"server:{k}@{KILL_SECONDS}s" for k in slots), n=n)
    if moment == "push":
        if victim == "two":
            return cell(fps=",".join(f"apply@server:{k}#{HIT}" for k in slots), n=2)
        return cell(fps=f"apply@{_positional(s, victim)}#{HIT}")
    if moment == "snapshot_write":
        if s.name != "checkpoint":
            return None
        # the third write (version 20) dies after its temporary file is fsynced
        return cell(fps=",".join(f"snapshot_write@server:{k}#3" for k in slots), n=n)
    if not s.chain or victim == "two":
        return None
    me = slots[0]
    if moment == "answered":
        # the head has answered a push and not yet forwarded it (with tail ack the pushing
        # worker sends it again). The head passes there once per forwarded batch.
        every = int(s.env.get("FTMPI_REPLICATE_EVERY", "1"))
        return cell(fps=f"answered@head:0#{HIT // every}") if victim == "head" else None
    if moment == "reconfigure":
        # another member dies first; the victim dies in the reconfiguration that follows
        other = 2 if me == 0 else 0
        return cell(kill=f"server:{other}@step={KILL_STEP}", fps=f"reconfigure@server:{me}", n=2)
    if moment == "state_transfer":
        # the replacement joins at the tail; its predecessor sends the state. The tail sends to
        # a replaced head; a middle that became tail sends to a replaced tail (its first
        # transfer was at start, to the original tail). A head never sends to a replacement.
        if victim == "tail":
            return cell(kill=f"server:0@step={KILL_STEP}", fps="state_transfer@server:2", n=2)
        if victim == "middle":
            return cell(kill=f"server:2@step={KILL_STEP}", fps="state_transfer@server:1#2", n=2)
    return None


def all_cells() -> list[Cell]:
    """Every applicable cell, in a fixed order."""
    out = []
    for s in STRATEGIES.values():
        for mode in MODES:
            for victim in VICTIMS:
                for moment in MOMENTS:
                    c = _make(s, mode, victim, moment)
                    if c is not None:
                        out.append(c)
    return out


def _values(c: Cell) -> set[tuple[str, str]]:
    return {(k, getattr(c, k)) for k in ("strategy", "mode", "victim", "moment")}


def ci_slice(cells: list[Cell] | None = None) -> list[Cell]:
    """A deterministic subset covering every strategy, mode, victim and moment at least once:
    greedily the cell covering most values not yet covered (ties: first in ``all_cells``)."""
    cells = all_cells() if cells is None else cells
    todo = (
        {("strategy", v) for v in STRATEGIES}
        | {("mode", v) for v in MODES}
        | {("victim", v) for v in VICTIMS}
        | {("moment", v) for v in MOMENTS}
    )
    chosen: list[Cell] = []
    while todo:
        best = max(cells, key=lambda c, todo=todo: len(todo & _values(c)))
        if not todo & _values(best):
            raise ValueError(f"no cell covers {sorted(todo)}")
        chosen.append(best)
        todo -= _values(best)
    return chosen


# ---------------------------------------------------------------------------- running a cell

Runner = Callable[..., Any]
"""``run_mpi``-shaped: (np, args, env=..., timeout=...) -> result with returncode, json_lines."""


@dataclass
class Outcome:
    cell: Cell | None
    seconds: float
    kills: int = 0
    checked: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


class Checker:
    """Records each invariant checked and each that failed, with the values that broke it."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def __call__(self, name: str, ok: bool, detail: object = "") -> bool:
        self.outcome.checked.append(name)
        if not ok:
            self.outcome.failures.append(f"{name}: {detail}")
        return ok


def run_job(
    run: Runner,
    run_dir: Path,
    strategy: Strategy,
    env: dict[str, str],
    timeout: float,
    *,
    steps: int = STEPS,
    extra: tuple[str, ...] = (),
):
    """Run ft_train.py with ``strategy``'s servers; returns the result and the sorted reports."""
    full_env = {
        "FTMPI_SERVERS": str(strategy.servers),
        "FTMPI_RUN_DIR": str(run_dir),
        "FTMPI_BACKEND": "mpi",
        **env,
    }
    args = [PROG, str(steps), "--await-replacements", *strategy.extra, *extra]
    res = run(2 + strategy.servers, args, env=full_env, timeout=timeout)
    return res, sorted(res.json_lines(), key=lambda r: r["worker"])


class References:
    """The runs without failure, one per (strategy, mode), computed on first use."""

    def __init__(self, run: Runner, root: Path, timeout: float) -> None:
        self.run, self.root, self.timeout = run, root, timeout
        self._got: dict[tuple[str, str, int], list[dict]] = {}

    def __call__(self, strategy: Strategy, mode: str, steps: int = STEPS) -> list[dict]:
        key = (strategy.name, mode, steps)
        if key not in self._got:
            res, reports = run_job(
                self.run,
                self.root / f"ref-{strategy.name}-{mode}-{steps}",
                strategy,
                {**strategy.env, "FTMPI_MODE": mode},
                self.timeout,
                steps=steps,
            )
            if res.returncode != 0 or len(reports) != 2:
                raise RuntimeError(f"reference run {key} failed: {res.stderr[-2000:]}")
            self._got[key] = reports
        return self._got[key]


def run_cell(
    cell: Cell, run: Runner, root: Path, refs: References, *, timeout: float = 300
) -> Outcome:
    """Run one cell and check its invariants; never raises for a broken invariant."""
    s = STRATEGIES[cell.strategy]
    out = Outcome(cell, 0.0)
    check = Checker(out)
    t0 = time.monotonic()
    run_dir = root / cell.id
    try:
        res, got = run_job(run, run_dir, s, cell.env(), timeout, extra=cell.extra())
    except BaseException as exc:  # pytest.fail on a timeout: a hang
        if isinstance(exc, KeyboardInterrupt):
            raise
        out.seconds = time.monotonic() - t0
        out.kills = len(kills(run_dir))
        lines = str(exc).splitlines()
        check("no hang", False, " | ".join([lines[0], *lines[-12:]]) if lines else repr(exc))
        return out
    out.seconds = time.monotonic() - t0
    check("no hang", res.returncode != -9, "killed after the wall-clock limit")
    check("exit status", res.returncode in cell.codes, f"{res.returncode}: {res.stderr[-1500:]}")
    out.kills = len(kills(run_dir))
    check("kills carried out", out.kills == cell.expected_kills, f"{kills(run_dir)}")
    if not check("every worker reports", len(got) == 2, (res.stdout + res.stderr)[-2500:]):
        _keep_output(run_dir, res)
        return out
    # a death in the first step comes before any snapshot: nothing to roll back to
    first_step = any(
        e["event"] == "step_resumed" and e["position"] <= 1 for e in read_events(str(run_dir))
    )
    check_invariants(cell, s, got, check, refs, died_in_first_step=first_step)
    if not out.ok:
        _keep_output(run_dir, res)
    return out


def _keep_output(run_dir: Path, res: Any) -> None:
    """A failed cell's whole output, beside its event log, for the diagnosis."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "output.txt").write_text(f"exit {res.returncode}\n{res.stdout}\n{res.stderr}")


def check_invariants(
    cell: Cell,
    s: Strategy,
    got: list[dict],
    check: Checker,
    refs: References,
    *,
    died_in_first_step: bool = False,
) -> None:
    """The strategy's promises for this cell (docs/recovery.md)."""
    sync = cell.mode == "sync"
    worker_died = cell.victim == "worker" or cell.moment == "pull"
    check("every worker at the end", all(r["position"] == STEPS for r in got), got)
    if sync:
        check("workers agree", got[0]["weights"] == got[1]["weights"], got)
    # ft_train.py shards the data by the rank a worker started with: when worker 0 dies, the
    # survivor (now worker 0) keeps worker 1's batches and so does the replacement, so the
    # data, not the updates, differ from the run without failure (version == steps still holds)
    same_data = "worker:0" not in cell.failpoints
    if sync and s.exact and same_data:
        ref = refs(s, cell.mode)
        check("bit-exact vs no failure", got[0]["weights"] == ref[0]["weights"], got[0])
    # the server counters as the worker that asked last saw them: in async mode a worker may
    # ask before the other's last pushes, and the later request comes after both workers' last
    last = max(got, key=lambda r: sum(r["versions"]))
    versions = last["versions"]
    if s.lost_bound is not None:
        expected = STEPS if sync else 2 * STEPS
        lost = expected - versions[0]
        if not worker_died:
            check(f"lost <= {s.lost_bound}", 0 <= lost <= s.lost_bound, versions)
    elif s.stateless:
        logged = sum(r["stale"]["logged"] for r in got)
        check("replayed == logged", sum(r["stale"]["replayed"] for r in got) == logged, got)
        if not worker_died:
            expected = STEPS if sync else sum(r["computed"] for r in got)
            check("version == gradients computed", versions == [expected] * s.servers, got)
            check("server replayed == logged", sum(last["replayed"]) == logged, got)
    elif s.chain and not sync and not worker_died:
        check("every push applied once", versions == [2 * STEPS], versions)
    elif s.name == "checkpoint" and not sync and not worker_died:
        if died_in_first_step:  # (a time kill on a slow start) the retry initialises the servers
            check("no rollback before training", all(r["rollbacks"] == 0 for r in got), got)
        else:
            check("rolled back", all(r["rollbacks"] >= 1 for r in got), got)
        check("rewound steps redone", all(r["computed"] >= STEPS for r in got), got)
    if sync and not (s.lost_bound or s.stateless):
        check("version == steps", set(versions) == {STEPS}, versions)


# ---------------------------------------------------------------------------------- script


def summary(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    return {
        "cells": len(outcomes),
        "passed": sum(o.ok for o in outcomes),
        "kills_survived": sum(o.kills for o in outcomes if o.ok),
        "invariants_checked": sum(len(o.checked) for o in outcomes),
        "seconds": round(seconds, 1),
        "failures": {o.cell.id: o.failures for o in outcomes if not o.ok and o.cell},
    }


def interleaved(cells: list[Cell]) -> list[Cell]:
    """The CI slice first, then the other cells round-robin over strategies, so a run cut
    short by ``--budget`` has still covered every strategy, mode, victim and moment."""
    first = ci_slice(cells)
    rest: dict[str, list[Cell]] = {}
    for c in cells:
        if c not in first:
            rest.setdefault(c.strategy, []).append(c)
    out = list(first)
    while any(rest.values()):
        out += [q.pop(0) for q in rest.values() if q]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.mpi.matrix", description=__doc__)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--full", action="store_true", help="every cell")
    which.add_argument("--ci", action="store_true", help="the CI slice")
    which.add_argument("--list", action="store_true", help="list the cells and exit")
    p.add_argument(
        "--only",
        default="",
        help="run only cells whose id contains this text (or one of several, comma-separated)",
    )
    p.add_argument("--root", default="runs/fault-matrix", help="run directories go here")
    p.add_argument("--json", default="", help="write the outcomes here")
    p.add_argument("--timeout", type=float, default=300, help="seconds per job")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once")
    p.add_argument(
        "--budget", type=float, default=0, help="start no cell after this many seconds (0: none)"
    )
    args = p.parse_args(argv)
    cells = ci_slice() if args.ci else interleaved(all_cells())
    wanted = args.only.split(",")
    cells = [c for c in cells if any(w in c.id for w in wanted)]
    if args.list:
        for c in cells:
            print(c.id, c.env())
        print(f"{len(cells)} cells")
        return 0
    from tests.conftest import run_mpi

    root = Path(args.root) / time.strftime("%Y%m%d-%H%M%S")
    refs = References(run_mpi, root, args.timeout)
    for c in cells:  # the references first, so parallel cells never compute one twice
        if c.mode == "sync" and STRATEGIES[c.strategy].exact:
            refs(STRATEGIES[c.strategy], "sync")
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    skipped: list[str] = []

    def one(c: Cell) -> None:
        if args.budget and time.monotonic() - t0 > args.budget:
            skipped.append(c.id)
            return
        o = run_cell(c, run_mpi, root, refs, timeout=args.timeout)
        outcomes.append(o)
        verdict = "ok  " if o.ok else "FAIL"
        print(
            f"[{len(outcomes)}/{len(cells)}] {verdict} {c.id} {o.seconds:.1f}s kills={o.kills} "
            f"invariants={len(o.checked)} {'; '.join(o.failures)[:600]}",
            flush=True,
        )

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(one, cells))
    result = {
        "matrix_size": len(all_cells()),
        **summary(outcomes, time.monotonic() - t0),
        "not_run": skipped,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        detail = [
            {
                "cell": o.cell.id,
                "env": o.cell.env(),
                "seconds": round(o.seconds, 1),
                "kills": o.kills,
                "checked": o.checked,
                "failures": o.failures,
            }
            for o in outcomes
            if o.cell is not None
        ]
        Path(args.json).write_text(json.dumps({**result, "outcomes": detail}, indent=1))
    return 0 if result["passed"] == result["cells"] and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
