"""``ftmpi-run``: start a fault-tolerant job, or inspect one.

    ftmpi-run -np 2 --servers 1 [options] -- python train.py ARGS     (launch: the default form)
    ftmpi-run summary RUN_DIR                                          (a run's summary table)
    ftmpi-run replay RUN_DIR                    (re-run a recorded run; compare its weights)
    ftmpi-run diff RUN_A RUN_B                       (what differs between two runs; results)
    ftmpi-run bench [SUITE ...] [--quick] [--out FILE.json]     (performance vs baselines)

``-np`` counts worker ranks (as in horovodrun); ``--servers`` adds server ranks after them. The
job's configuration travels in ``FTMPI_*`` environment variables only, so ``mpirun -np 3 -x
FTMPI_SERVERS=1 python train.py`` behaves the same. Everything is validated before anything
starts; the command line is printed before it runs, and ``--dry-run`` prints it only.

Subcommands are dispatched through :data:`SUBCOMMANDS` (name -> ``main(argv) -> int``); any
other first argument is the launch form.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from ftmpi.config import ENV_PREFIX, ConfigError
from ftmpi.faults import parse_schedule
from ftmpi.strategies import Strategy
from launch import bench, diff, experiment, replay, summary
from launch.command import LAUNCHERS, JobSpec, build_command, find_launcher, process_env
from launch.jobenv import add_config_flags, config_overrides, job_environment, server_updates
from launch.kills import kill_flags_text, parse_kill_flags, random_schedule
from launch.nodes import NodePlan, parse_hostfile, parse_hosts, slurm_nodes, write_placement
from launch.preflight import refuse_unusable_checkpoint_dir
from launch.restart import LaunchReport, run_with_restarts
from launch.rundir import refuse_finished, refuse_other_unfinished, resolve

SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "summary": summary.main,
    "replay": replay.main,
    "diff": diff.main,
    "experiment": experiment.main,
    "bench": bench.main,
}
"""``ftmpi-run NAME ARGS...`` runs ``SUBCOMMANDS[NAME](ARGS)``."""


def build_parser() -> argparse.ArgumentParser:
    """The launch form's argument parser."""
    p = argparse.ArgumentParser(
        prog="ftmpi-run",
        description=__doc__.splitlines()[0],
        usage="ftmpi-run [options] -- COMMAND [ARGS...]\n       ftmpi-run summary RUN_DIR",
        epilog=f"subcommands: {', '.join(sorted(SUBCOMMANDS))} (ftmpi-run NAME --help)",
    )
    p.add_argument(
        "-np",
        "--num-workers",
        dest="workers",
        type=int,
        default=None,
        help="worker ranks (default FTMPI_WORKERS, else 2)",
    )
    add_config_flags(p)
    p.add_argument("--run-dir", default=None, help="run directory (default runs/<run id>)")
    fail = p.add_argument_group("failure injection")
    fail.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="ROLE[:INDEX]@WHEN",
        help="kill a rank: ROLE server|worker|head|tail, WHEN step=N or SECONDSs (repeatable)",
    )
    fail.add_argument(
        "--random-kills",
        type=int,
        default=0,
        metavar="K",
        help="add K kills at random roles, indices and times (seeded by --seed)",
    )
    fail.add_argument("--steps", type=int, default=None, help="the run's length in steps")
    fail.add_argument("--duration", type=float, default=None, help="the run's length in seconds")
    fail.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="M",
        help="relaunch a failed job up to M times, resuming from the newest snapshot",
    )
    mpi = p.add_argument_group("MPI launcher")
    mpi.add_argument("--launcher", choices=LAUNCHERS, default="mpirun", help="default mpirun")
    mpi.add_argument(
        "--mpirun",
        default=None,
        metavar="PATH",
        help="launcher program (default: mpirun installed with ftmpi, else PATH)",
    )
    mpi.add_argument("-H", "--hosts", default=None, help="host list, e.g. node1:4,node2:4")
    mpi.add_argument("--hostfile", default=None, help="MPI hostfile (mpirun, mpiexec)")
    mpi.add_argument(
        "--spare-nodes",
        default=None,
        metavar="N1,N2",
        help="nodes of the hostfile/host list that start with no rank: replacements and the "
        "ranks of a lost node go there (mpirun)",
    )
    mpi.add_argument(
        "--no-ulfm", action="store_true", help="do not pass --with-ft ulfm (an MPI without ULFM)"
    )
    mpi.add_argument("--dry-run", action="store_true", help="print the command line and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the training command, after --")
    return p


def launch(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """The launch form; returns the job's exit status (``128 + signal`` if a signal ended it).
    Bad input ends with ``SystemExit`` naming the value and the fix, before anything starts."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(list(argv))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        plan = _plan(args, command, environ)
    except ValueError as exc:  # ConfigError, LaunchError, RunDirError, kill schedules
        raise SystemExit(f"ftmpi-run: {exc}") from None
    env, make_command, report, nodes = plan
    report.invocation = {
        "argv": list(argv),
        "cwd": os.getcwd(),
        "environ": {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)},
        "python": sys.executable,
    }
    if args.dry_run:
        print("ftmpi-run:", shlex.join(make_command(env)), flush=True)
        return 0
    report.load_earlier()
    run_with_restarts(
        make_command,
        env,
        report,
        schedule=parse_schedule(env.get("FTMPI_KILL", "")),
        job_start=float(env["FTMPI_JOB_START"]),
        process_env=lambda e: process_env(e, environ),
        resume_command=resume_command(argv, command, report.run_dir),
        nodes=nodes,
    )
    print(report.final_line(), flush=True)
    return report.returncode


def _plan(
    args: argparse.Namespace, command: list[str], environ: Mapping[str, str]
) -> tuple[dict[str, str], Callable[[Mapping[str, str]], list[str]], LaunchReport, NodePlan | None]:
    """Validate everything and return the job's environment, its command builder, an empty
    report and, for a multi-node ``mpirun``, its nodes. Raises ``ValueError`` (or a subclass)
    naming the bad value."""
    if not command:
        raise ValueError("no command given; usage: ftmpi-run -np 2 --servers 1 -- python train.py")
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts {args.max_restarts} is negative; use 0 or more")
    workers = args.workers if args.workers is not None else _env_int(environ, "FTMPI_WORKERS", 2)
    explicit = parse_kill_flags(args.kill)
    resume = bool(args.resume) or environ.get("FTMPI_RESUME") == "1"
    run_id, run_dir = resolve(args.run_dir, environ, resume=resume)
    overrides = {**config_overrides(args), "run_id": run_id, "run_dir": run_dir}
    length = {"steps": args.steps, "duration": args.duration}
    for name, value in length.items():
        if value is not None and value <= 0:
            raise ValueError(f"--{name} {value} must be positive")
    config, _ = job_environment(environ, overrides, workers=workers, **length)
    randoms = random_schedule(
        args.random_kills,
        config.seed,
        workers=workers,
        servers=config.servers,
        steps=args.steps,
        updates=server_updates(config, workers=workers, steps=args.steps) if args.steps else None,
        duration=args.duration,
    )
    kills = [*explicit, *randoms] if explicit or randoms else None
    config, env = job_environment(environ, overrides, workers=workers, kills=kills, **length)
    spec = JobSpec(
        launcher=args.launcher,
        executable=args.launcher,  # resolved once the options are known to fit it
        nprocs=workers + config.servers,
        env={},
        command=command,
        hosts=args.hosts,
        hostfile=args.hostfile,
        ulfm=not args.no_ulfm,
        as_root=os.geteuid() == 0,
        cpus=os.cpu_count() or 1,
    )

    nodes = _node_plan(args, environ)
    if nodes is not None and Strategy.named(config.strategy).replicates:
        # a chain's state outlives a lost node in the other nodes' memory (launch.nodes)
        env.setdefault("FTMPI_NODE_COPY_DIR", f"/dev/shm/ftmpi-{run_id}")

    def make_command(job_env: Mapping[str, str]) -> list[str]:
        if nodes is None or args.dry_run:
            return build_command(dataclasses.replace(spec, env=job_env))
        # each attempt runs on the nodes still usable (launch.nodes): a hostfile of its own,
        # the initial ranks kept off the spares by a rankfile
        hostfile, rankfile = write_placement(nodes, spec.nprocs, run_dir, len(nodes.lost))
        job_env = {**job_env, "FTMPI_SPARE_NODES": ",".join(nodes.free_spares)}
        return build_command(
            dataclasses.replace(spec, env=job_env, hostfile=hostfile, hosts=None, rankfile=rankfile)
        )

    make_command(env)  # refuse a launcher/option mismatch now, whether or not it is installed
    spec = dataclasses.replace(
        spec, executable=find_launcher(args.launcher, args.mpirun, required=not args.dry_run)
    )
    if not args.dry_run:
        refuse_finished(run_dir)
        refuse_unusable_checkpoint_dir(config)  # exits 2, before anything starts
        refuse_other_unfinished(run_dir, run_id)
    env.setdefault("FTMPI_JOB_START", repr(time.time()))  # time-scheduled kills count from here
    random_info = None
    if randoms:
        random_info = {"count": args.random_kills, "seed": config.seed, **length}
        random_info["schedule"] = [str(s) for s in randoms]
        print(
            f"ftmpi-run: random kills (--random-kills {args.random_kills}, seed {config.seed}); "
            f"replay with: {kill_flags_text(randoms)}",
            flush=True,
        )
    report = LaunchReport(
        run_id=run_id,
        run_dir=run_dir,
        max_restarts=args.max_restarts,
        schedule=config.kill,
        random_kills=random_info,
    )
    return env, make_command, report, nodes


def _node_plan(args: argparse.Namespace, environ: Mapping[str, str]) -> NodePlan | None:
    """The nodes of a multi-node ``mpirun`` job (``--hostfile``, ``-H``, or the Slurm
    allocation it runs in), with its spares; None for any other launch. Raises ``NodeError``
    naming a bad file, list or spare."""
    spares = [s for s in (args.spare_nodes or "").split(",") if s]
    if args.hostfile and args.hosts:
        raise ValueError("give the nodes either with --hostfile or with -H, not both")
    listed = None
    if args.launcher == "mpirun":
        if args.hostfile:
            listed = parse_hostfile(args.hostfile)
        elif args.hosts:
            listed = parse_hosts(args.hosts)
        else:
            listed = slurm_nodes(environ)
    if listed is None:
        if spares:
            raise ValueError(
                f"--spare-nodes {args.spare_nodes}: spares need mpirun with --hostfile, -H or "
                "a Slurm allocation"
            )
        return None
    return NodePlan(listed, spares)


def resume_command(argv: Sequence[str], command: Sequence[str], run_dir: str) -> str:
    """The ``ftmpi-run`` command line that resumes this run: ``argv`` with ``--resume`` and
    ``--run-dir RUN_DIR`` before the training ``command`` (its last words)."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv) - len(command)
    options, command = argv[:cut], argv[cut:]
    if "--resume" not in options:
        options.append("--resume")
    if "--run-dir" not in options and not any(a.startswith("--run-dir=") for a in options):
        options += ["--run-dir", run_dir]
    return shlex.join(["ftmpi-run", *options, *command])


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; set a worker count") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``ftmpi-run`` entry point: a subcommand from :data:`SUBCOMMANDS`, else the launch form."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
