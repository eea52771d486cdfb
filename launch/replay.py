"""``ftmpi-run replay RUN_DIR``: run a recorded run again and check it ends with the same weights.

**What is re-run.** A run started by ``ftmpi-run`` has its invocation in ``launcher.json``
(``argv``, ``cwd``, the caller's ``FTMPI_*`` variables): the replay calls ``ftmpi-run`` with the
same arguments from the same directory with those variables, so the command line, config,
seeds and failure schedule (``--kill``, and ``--random-kills``, which are seeded) are the
recorded ones. A run started some other way (plain ``mpirun``) is rebuilt from its manifest:
``-np``/``--servers`` from the layout, the recorded ``FTMPI_*`` variables, the first attempt's
kill schedule, and ``python argv``. Either way the replay gets a new run id and directory
(default ``<RUN_DIR>-replay-<6 hex>``, beside the original); an argument naming the original
directory is changed to the new one, and ``FTMPI_RESUME`` is dropped (the replay starts from
step 0).

**The verdict.** Exit status 0 when both runs' final weights hashes (manifest outcome, else
``summary.json``, which ftmpi writes for any script) are equal and the replay finished
(its ``summary.json`` says so). Otherwise 1, with the first evaluation where the runs' metrics
diverge and the manifest fields that differ (as ``ftmpi-run diff`` shows them); the replayed
job's own status if it failed before writing its results. Time-scheduled kills (``@30s``) are
replayed at the same time, not the same step, which is warned about before the run.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ftmpi.config import ENV_PREFIX
from ftmpi.faults import parse_schedule
from launch.compare import (
    Run,
    difference_lines,
    divergence_line,
    field_differences,
    load_run,
    script_change,
)
from launch.rundir import SUMMARY, refuse_finished

DROPPED_VARS = ("FTMPI_RUN_ID", "FTMPI_RUN_DIR", "FTMPI_JOB_START", "FTMPI_RESUME")
"""Variables of the recorded run that a replay does not take over."""


@dataclass(frozen=True)
class ReplayPlan:
    """How to start the replay: ``ftmpi-run ARGV`` in ``cwd`` with ``FTMPI_*`` ``env``."""

    argv: list[str]
    cwd: str
    env: dict[str, str]
    run_dir: str
    source: str
    """``launcher.json`` or ``manifest.json``: where the invocation came from."""


def _retarget(args: Sequence[str], old: Sequence[str], new: str) -> list[str]:
    """``args`` with every argument equal to a spelling of the old run directory (or of the
    form ``--opt=OLD``) pointing at ``new`` instead."""
    out = []
    for arg in args:
        name, eq, value = arg.partition("=")
        if arg in old:
            arg = new
        elif eq and value in old:
            arg = f"{name}={new}"
        out.append(arg)
    return out


def _without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` (the launcher's options, before ``--``) without ``option VALUE``."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if "--" in argv[:i]:
            out.append(arg)
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def plan_replay(run: Run, run_dir: str | None = None) -> ReplayPlan:
    """The replay of ``run`` into ``run_dir`` (default: a new sibling directory). Raises
    ``ValueError`` if neither ``launcher.json`` nor the manifest says how the run started."""
    old_dir = os.path.abspath(run.run_dir)
    new_dir = os.path.abspath(run_dir or f"{old_dir}-replay-{secrets.token_hex(3)}")
    recorded = (run.manifest.get("config") or {}).get("run_dir") or ""
    old = [s for s in {run.run_dir, old_dir, recorded, os.path.abspath(recorded)} if s]
    invocation = (run.launcher or {}).get("invocation")
    if invocation:
        env = dict(invocation.get("environ") or {})
        argv = _retarget(_without_option(invocation["argv"], "--run-dir"), old, new_dir)
        argv = ["--run-dir", new_dir, *argv]
        cwd, source = invocation["cwd"], "launcher.json"
    else:
        m = run.manifest
        layout, script_argv = m.get("layout") or {}, m.get("argv")
        if not script_argv or "workers" not in layout:
            raise ValueError(
                f"{run.run_dir}: neither launcher.json (an ftmpi-run invocation) nor the "
                "manifest's argv and layout say how the run started; it cannot be replayed"
            )
        env = dict(m.get("ftmpi_env") or {})
        env["FTMPI_KILL"] = (m.get("failures") or {}).get("schedule", env.get("FTMPI_KILL", ""))
        servers = str(len(layout.get("servers", [])))
        command = [m.get("python") or sys.executable, *_retarget(script_argv, old, new_dir)]
        argv = ["-np", str(len(layout["workers"])), "--servers", servers]
        argv += ["--run-dir", new_dir, "--", *command]
        cwd, source = m.get("cwd") or os.getcwd(), "manifest.json"
    env = {k: v for k, v in env.items() if k not in DROPPED_VARS}
    env = {k: _retarget([v], old, new_dir)[0] for k, v in env.items()}
    return ReplayPlan(argv=argv, cwd=cwd, env=env, run_dir=new_dir, source=source)


def timed_kills(plan: ReplayPlan) -> list[str]:
    """Time-scheduled kills of the replay (they may hit at another step than the original's)."""
    specs = parse_schedule(plan.env.get("FTMPI_KILL", ""))
    argv = list(plan.argv)
    specs += [parse_schedule(argv[i + 1])[0] for i, a in enumerate(argv[:-1]) if a == "--kill"]
    return [str(s) for s in specs if s.seconds is not None]


def run_plan(plan: ReplayPlan, environ: Mapping[str, str]) -> int:
    """Start ``ftmpi-run`` as planned (output passed through); return its exit status."""
    refuse_finished(plan.run_dir)
    env = {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(plan.env)
    cmd = [sys.executable, "-m", "launch.cli", *plan.argv]
    return subprocess.run(cmd, cwd=plan.cwd, env=env, check=False).returncode


def verdict(original: Run, replayed: Run) -> tuple[bool, list[str]]:
    """Whether the replay finished with the original's final weights, and the report lines."""
    a, b = original.weights, replayed.weights
    finished = (replayed.summary or {}).get("finished", replayed.summary is not None)
    if a is not None and a == b and finished:
        return True, [f"ftmpi-run replay: final weights hash matches ({a})"]
    if a is not None and a == b:
        return False, [
            f"ftmpi-run replay: final weights hash matches ({a}), but the replay did not "
            f"finish ({SUMMARY}: finished {finished})"
        ]
    lines = [
        f"ftmpi-run replay: final weights hash DIFFERS: original {a or 'missing'}, "
        f"replay {b or 'missing'}"
    ]
    changed = script_change(original, replayed)
    if changed:
        lines.append(f"  {changed} (A: original, B: replay)")
    lines.append("  " + divergence_line(original, replayed) + " (A: original, B: replay)")
    diffs = field_differences(original, replayed)
    lines.append(
        f"  manifest fields that differ ({len(diffs)}):" if diffs else "  no field differs"
    )
    lines += difference_lines(diffs, indent="    ")
    return False, lines


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """Entry point of ``ftmpi-run replay``."""
    p = argparse.ArgumentParser(
        prog="ftmpi-run replay",
        description="Re-run a recorded run and check that its final weights hash matches.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the recorded run, e.g. runs/<run id>")
    p.add_argument("--run-dir", dest="new_dir", default=None, help="the replay's directory")
    p.add_argument("--dry-run", action="store_true", help="print the replay's command only")
    args = p.parse_args(list(argv))
    environ = os.environ if environ is None else environ
    try:
        original = load_run(args.run_dir)
        plan = plan_replay(original, args.new_dir)
        if not args.dry_run:
            refuse_finished(plan.run_dir)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"ftmpi-run replay: {exc}") from None
    env_text = " ".join(f"{k}={v}" for k, v in sorted(plan.env.items()))
    print(
        f"ftmpi-run replay: from {plan.source}, in {plan.cwd}: {env_text} ftmpi-run "
        + " ".join(plan.argv),
        flush=True,
    )
    for spec in timed_kills(plan):
        print(
            f"ftmpi-run replay: warning: kill {spec} is time-scheduled; it may hit at another "
            "step than in the original run",
            flush=True,
        )
    if args.dry_run:
        return 0
    status = run_plan(plan, environ)
    try:
        replayed = load_run(plan.run_dir)
    except (OSError, ValueError) as exc:
        print(f"ftmpi-run replay: the replay exited with status {status}: {exc}", flush=True)
        return status or 1
    same, lines = verdict(original, replayed)
    print("\n".join(lines), flush=True)
    return 0 if same else 1
