"""``ftmpi-run experiment paper``: the seed paper's grid of strategies and failure schedules.

Every cell is one real ``ftmpi-run`` job of ``examples/paper_trainer.py`` (the paper's CNN,
digits data by default) with its own run directory ``<out>/runs/<cell>/``; cells run one after
the other. The grid: ``checkpoint`` and ``chain`` in sync and async mode, ``stateless`` and
``chain+stateless`` (sync), each with 0, 1 and 2 server kills, plus a no-failure control
(strategy ``none``). The paper's schedule, every time multiplied by ``--time-scale F``: a run of
200 s of training, kill at 30 s, replacement 20 s after the death (``--down-for``), second kill
at 80 s. Chains (3 servers, ``next`` acks, replicated every 100 updates, as in the paper) lose
their head (``head:0``); the other strategies lose ``server:0``. Kill times count from the
job's launch, so training starts ``--kill-offset`` seconds (not scaled) after the launch (the
trainer's ``--start-at``; enough for the MPI start-up) and every kill time is shifted by that
much: on the paper's clock, zero is the start of training. A start-up slower than the offset
delays training and shows in the table (``late_start_s``).

A cell ftmpi refuses to configure is recorded as ``not supported: <ConfigError message>``; a
cell whose job fails is recorded with its error and the grid goes on. A job that hangs at exit
after its trainer wrote ``summary.json`` (Open MPI after a re-spawn, docs/recovery.md) is stopped
after ``--exit-grace`` seconds and counts as finished. Each cell's state is in
``<out>/runs/<cell>/cell.json``; ``--resume`` skips cells already finished or refused.

Outputs in ``<out>``: ``results.csv`` and ``results.md`` (the table, columns defined in
:mod:`launch.results`), ``ranks.csv`` (CPU and memory per process) and ``figures/*.png`` with
the plotted data beside each as JSON (:mod:`launch.figures`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ftmpi.config import ConfigError
from ftmpi.manifest import write_json_atomic
from launch import figures, results
from launch.jobenv import job_environment
from launch.kills import parse_kill_flags
from launch.proctree import kill_tree

TRAINER = Path(__file__).resolve().parents[1] / "examples" / "paper_trainer.py"
PAPER_RUN_SECONDS = 200.0
PAPER_KILLS = (30.0, 80.0)
PAPER_DOWN_SECONDS = 20.0
CHAIN = {"chain_length": 3, "chain_ack": "next", "replicate_every": 100}


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    name: str
    strategy: str
    mode: str
    kills: int
    options: dict[str, Any]
    """Config fields set by ``ftmpi-run`` flags (``servers``, ``chain_ack``, ...)."""
    kill_specs: list[str] = field(default_factory=list)

    def launch_args(self) -> list[str]:
        """The ``ftmpi-run`` flags for :attr:`options` and :attr:`kill_specs`."""
        args = [f"--mode={self.mode}", f"--strategy={self.strategy}"]
        args += [f"--{k.replace('_', '-')}={v}" for k, v in self.options.items()]
        return args + [f"--kill={s}" for s in self.kill_specs]


@dataclass(frozen=True)
class Schedule:
    """The grid's times in seconds: training length, kill times from launch, down time."""

    run: float
    kills: tuple[float, ...]
    down_for: float

    @classmethod
    def paper(cls, scale: float, offset: float) -> Schedule:
        return cls(
            run=PAPER_RUN_SECONDS * scale,
            kills=tuple(round(offset + t * scale, 3) for t in PAPER_KILLS),
            down_for=round(PAPER_DOWN_SECONDS * scale, 3),
        )


def paper_grid(schedule: Schedule) -> list[Cell]:
    """The seed paper's grid (module docstring), control first."""
    variants = [
        ("checkpoint", "sync", {"servers": 1, "checkpoint_every": 100}),
        ("checkpoint", "async", {"servers": 1, "checkpoint_every": 100}),
        ("chain", "sync", {"servers": 3, **CHAIN}),
        ("chain", "async", {"servers": 3, **CHAIN}),
        ("stateless", "sync", {"servers": 1, "stale_policy": "sum-scaled"}),
        ("chain+stateless", "sync", {"servers": 3, **CHAIN, "stale_policy": "sum-scaled"}),
    ]
    cells = [Cell("none-sync-k0", "none", "sync", 0, {"servers": 1})]
    for strategy, mode, options in variants:
        role = "head:0" if "chain" in strategy else "server:0"
        for k in range(len(schedule.kills) + 1):
            specs = [f"{role}@{t:g}s" for t in schedule.kills[:k]]
            opts = {**options, "down_for": schedule.down_for} if k else dict(options)
            cells.append(Cell(f"{strategy}-{mode}-k{k}", strategy, mode, k, opts, specs))
    return cells


EXPERIMENTS: dict[str, Callable[[Schedule], list[Cell]]] = {"paper": paper_grid}
"""``ftmpi-run experiment NAME`` runs ``EXPERIMENTS[NAME]``."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftmpi-run experiment",
        description="Run an experiment grid (one ftmpi-run job per cell), then tabulate and plot.",
    )
    p.add_argument("name", choices=sorted(EXPERIMENTS), help="the grid (paper: the seed paper's)")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply every run length and failure time by F (default 1)",
    )
    p.add_argument("--workers", type=int, default=1, help="worker ranks per cell (paper: 1)")
    p.add_argument(
        "--only",
        default=None,
        metavar="PATTERN",
        help="cells whose name matches (fnmatch; comma-separated patterns)",
    )
    p.add_argument("--out", default=None, help="output directory (runs/experiment-<timestamp>)")
    p.add_argument(
        "--resume", action="store_true", help="reuse --out, skipping cells already finished"
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=0.8,
        help="the table's time-to-target threshold (default 0.8)",
    )
    p.add_argument(
        "--kill-offset",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="training starts this long after launch (default 20, unscaled)",
    )
    p.add_argument("--data", default="digits", help="the trainer's --data (default digits)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N steps (paper 10)")
    p.add_argument(
        "--sample-every",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="CPU/memory sampling interval per process (default 0.5)",
    )
    p.add_argument(
        "--exit-grace",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="stop a job hung this long after its results",
    )
    p.add_argument("--trainer", default=str(TRAINER), help="training script (paper_trainer.py)")
    p.add_argument("--list", action="store_true", help="print the cells and their flags only")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the first bad option."""
    positive = ("time_scale", "workers", "eval_every", "sample_every")
    for name in positive:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be positive")
    for name in ("kill_offset", "exit_grace"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is negative")
    if not 0 < args.target_accuracy <= 1:
        raise ValueError(f"--target-accuracy {args.target_accuracy} must be in (0, 1]")
    if not os.path.isfile(args.trainer):
        raise ValueError(f"--trainer {args.trainer} is not a file; pass the training script")


def select(cells: Sequence[Cell], only: str | None) -> list[Cell]:
    """The cells matching ``only`` (comma-separated fnmatch patterns; all if ``None``). Raises
    ``ValueError`` listing the names when nothing matches."""
    if only is None:
        return list(cells)
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        names = ", ".join(c.name for c in cells)
        raise ValueError(f"--only {only!r} matches no cell; cells: {names}")
    return chosen


def refusal(cell: Cell, args: argparse.Namespace, schedule: Schedule, run_dir: str) -> str | None:
    """ftmpi's ``ConfigError`` message if it refuses the cell's configuration, else ``None``
    (validated exactly as ``ftmpi-run`` will, before anything starts)."""
    try:
        job_environment(
            {},
            cell.options | {"mode": cell.mode, "strategy": cell.strategy, "run_dir": run_dir},
            workers=args.workers,
            kills=parse_kill_flags(cell.kill_specs),
            duration=schedule.kills[-1] + schedule.run,
        )
    except (ConfigError, ValueError) as exc:
        return str(exc)
    return None


def default_out() -> str:
    return os.path.join("runs", f"experiment-{time.strftime('%Y%m%d-%H%M%S')}")


def check_out_dir(out: str, resume: bool) -> None:
    """Refuse an existing non-empty ``out`` unless resuming."""
    if os.path.isdir(out) and os.listdir(out) and not resume:
        raise ValueError(
            f"--out {out} exists and is not empty; pass --resume to continue that experiment "
            "or choose another --out (nothing was overwritten)"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; choose a directory")


def cell_command(
    cell: Cell, args: argparse.Namespace, schedule: Schedule, run_dir: str, job_start: float
) -> list[str]:
    """The ``ftmpi-run`` command line of one cell."""
    return [
        sys.executable, "-m", "launch.cli",
        "-np", str(args.workers), *cell.launch_args(),
        f"--duration={schedule.kills[-1] + schedule.run:g}", f"--run-dir={run_dir}",
        "--", sys.executable, args.trainer,
        f"--duration={schedule.run:g}", f"--eval-every={args.eval_every}",
        f"--data={args.data}", "--no-progress", f"--run-dir={run_dir}",
        f"--start-at={job_start + args.kill_offset!r}",
    ]  # fmt: skip


def cell_env(job_start: float, sample_every: float) -> dict[str, str]:
    """The cell job's environment: this process's without ``FTMPI_*`` (every cell is configured
    by its flags only), with the launch time and resource sampling set and oversubscription
    allowed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FTMPI_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    # a replacement needs a free slot: with as many ranks as cores, Open MPI refuses the spawn
    # (MPI_ERR_UNKNOWN) unless oversubscription is allowed
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    env["PYTHONUNBUFFERED"] = "1"
    env["FTMPI_JOB_START"] = repr(job_start)
    env["FTMPI_SAMPLE_RESOURCES"] = f"{sample_every:g}"
    return env


def run_cell(cell: Cell, args: argparse.Namespace, schedule: Schedule, run_dir: str) -> str:
    """Run one cell's job to its end and return its status: ``ok`` (with a note if the job
    exited non-zero or hung after writing its results) or ``failed: <reason>``."""
    job_start = time.time()
    record = {
        **asdict(cell),
        "job_start": job_start,
        "clock_zero": job_start + args.kill_offset,
        "sample_every": args.sample_every,
    }
    write_json_atomic(os.path.join(run_dir, results.CELL_RECORD), {**record, "status": "running"})
    limit = 3 * (schedule.kills[-1] + schedule.run) + 120 + 2 * args.exit_grace
    command = cell_command(cell, args, schedule, run_dir, job_start)
    log_path = os.path.join(run_dir, "output.log")
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cell_env(job_start, args.sample_every),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        status = _wait(proc, run_dir, limit, args.exit_grace, log_path)
    write_json_atomic(
        os.path.join(run_dir, results.CELL_RECORD),
        {**record, "status": status, "wall_seconds": round(time.time() - job_start, 1)},
    )
    return status


def _wait(proc: subprocess.Popen[bytes], run_dir: str, limit: float, grace: float, log: str) -> str:
    deadline = time.monotonic() + limit
    finished_at: float | None = None
    summary = os.path.join(run_dir, "summary.json")
    while proc.poll() is None:
        now = time.monotonic()
        if finished_at is None and os.path.exists(summary):
            finished_at = now
        if finished_at is not None and now - finished_at > grace:
            _stop(proc)
            return "ok (hung at exit after writing its results; stopped)"
        if now > deadline:
            _stop(proc)
            return f"failed: no result within {limit:.0f} s; stopped"
        time.sleep(0.5)
    if os.path.exists(summary):
        return "ok" if proc.returncode == 0 else f"ok (exit status {proc.returncode} after results)"
    return f"failed: exit status {proc.returncode}: {_last_error(log)}"


def _die_with_parent() -> None:
    """In a cell's launcher, before it starts: SIGTERM it (it passes the signal on to the job)
    when the experiment process dies, so a killed experiment leaves no job behind. Linux only;
    elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the job's process group (the launcher passes it on), SIGKILL every process of
    the job after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            if sig == signal.SIGKILL:
                kill_tree(proc.pid)
            else:
                os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


_EXCEPTION = re.compile(r"^[\w.]+(Error|Exception|Timeout|Failure|Down): ")


def _last_error(log_path: str) -> str:
    """The last Python exception line of a job's output, else the last line naming an error,
    else its last line."""
    with open(log_path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    raised = [ln for ln in lines if _EXCEPTION.match(ln)]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (raised or errors or lines or ["no output"])[-1][:300]


def write_report(out: str, cells: Sequence[Cell], target: float, title: str) -> list[str]:
    """Tabulate and plot every cell of ``cells`` that has a run directory; return the files
    written."""
    runs = []
    for cell in cells:
        run_dir = os.path.join(out, "runs", cell.name)
        if os.path.exists(os.path.join(run_dir, results.CELL_RECORD)):
            runs.append(results.load_run(run_dir))
    rows = [results.row(r, target) for r in runs]
    files = [os.path.join(out, n) for n in ("results.csv", "results.md", "ranks.csv")]
    results.write_csv(files[0], rows, results.COLUMNS)
    with open(files[1], "w") as f:
        f.write(f"# {title}\n\n" + results.markdown_table(rows, results.COLUMNS))
    rank_rows = [r for run in runs for r in results.rank_rows(run)]
    results.write_csv(files[2], rank_rows, ("cell", "pid", "role", "cpu_pct", "peak_rss_mb"))
    plotted = [r for r in runs if r.metrics or r.samples]
    return files + figures.write_figures(plotted, os.path.join(out, "figures"), title)


def _finished(run_dir: str) -> bool:
    path = os.path.join(run_dir, results.CELL_RECORD)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        status = json.load(f).get("status", "")
    return status.startswith(("ok", "not supported"))


def main(argv: Sequence[str]) -> int:
    """Entry point of ``ftmpi-run experiment``; 0 when every cell ran (or was refused by
    ftmpi), 1 when a cell failed. Bad options stop it before any job starts."""
    args = build_parser().parse_args(list(argv))
    try:
        check_args(args)
        schedule = Schedule.paper(args.time_scale, args.kill_offset)
        cells = select(EXPERIMENTS[args.name](schedule), args.only)
        out = args.out or default_out()
        if not args.list:
            check_out_dir(out, args.resume)
    except ValueError as exc:
        raise SystemExit(f"ftmpi-run experiment: {exc}") from None
    if args.list:
        for cell in cells:
            print(cell.name, " ".join(cell.launch_args()))
        return 0
    title = f"{args.name} experiment, time scale {args.time_scale:g}, {args.workers} worker(s)"
    failed = 0
    for n, cell in enumerate(cells, 1):
        run_dir = os.path.join(out, "runs", cell.name)
        if args.resume and _finished(run_dir):
            print(f"experiment: [{n}/{len(cells)}] {cell.name}: already done", flush=True)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished attempt of this experiment
        os.makedirs(run_dir, mode=0o750)
        refused = refusal(cell, args, schedule, run_dir)
        if refused is not None:
            status = f"not supported: {refused}"
            record = {**asdict(cell), "job_start": time.time(), "status": status}
            write_json_atomic(os.path.join(run_dir, results.CELL_RECORD), record)
        else:
            print(f"experiment: [{n}/{len(cells)}] {cell.name}: running", flush=True)
            status = run_cell(cell, args, schedule, run_dir)
        failed += status.startswith("failed")
        print(f"experiment: [{n}/{len(cells)}] {cell.name}: {status}", flush=True)
    files = write_report(out, cells, args.target_accuracy, title)
    print(f"experiment: {len(cells)} cell(s), {failed} failed; wrote {', '.join(files)}")
    return 1 if failed else 0
